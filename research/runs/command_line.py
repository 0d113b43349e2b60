"""What the research commands add to the shared command-line convention
(`kernels.bench.command_line`): config-file and override errors as one line,
the multi-process flags, and JSON and text outputs written atomically.

  def main(argv=None):
    command_line.run("fusedlm evaluate", define_flags, _main, argv, doc=__doc__)

A user's mistake (a missing run, a bad flag value, a config file that does
not exist or does not load, a typo in a `--config.x=...` override, a file
that does not fit) is printed as one line, `<command>: error: <message>`,
and the command exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Callable, Sequence

from absl import flags

from fusedlm.kernels.bench import command_line as base
from fusedlm.research.data import partials
from fusedlm.research.runs import parallel
from fusedlm.research.training import eval_loop

USAGE_ERROR = base.USAGE_ERROR
_ERRNO = re.compile(r"^\[Errno \d+\] ")
fail = base.fail


def run(command: str, define: Callable[[flags.FlagValues], None],
        body: Callable[[flags.FlagValues], None], argv: Sequence[str] | None = None, *,
        doc: str | None = None) -> None:
  """`kernels.bench.command_line.run` with config-file errors as one line."""
  def checked(f: flags.FlagValues) -> None:
    if "config" in f:
      _load_config(f)
    body(f)
  base.run(command, define, checked, argv, doc=doc, parse_error=config_error)


def _load_config(f: flags.FlagValues) -> None:
  """ml_collections defers an error loading the --config file (missing, a
  syntax error, an exception in get_config) to the config's first use: use it
  now, so that it is one line before anything starts."""
  try:
    f.config.keys()
  except Exception as e:  # pylint: disable=broad-except
    # Anything a config file's own code raises is the file's problem, named
    # in one line (--debug shows where).
    raise ValueError(config_error(e)) from e


def define_config_flag(fv: flags.FlagValues, help_text: str,
                       default: str | None = None) -> None:
  """--config: an experiment file, `path.py` or `path.py:runlocal`, locked so that
  a `--config.x=...` typo is an error rather than a new field; required
  unless a default file is given."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", default, help_text, flag_values=fv,
                                  lock_config=True)
  if default is None:
    flags.mark_flag_as_required("config", flag_values=fv)


def config_error(error: Exception) -> str:
  """One line for an error raised while --config loads or applies overrides."""
  text = _unquote(error)
  if _raised_in_get_config(error):
    return f"the --config file's get_config failed: {type(error).__name__}: {base.one_line(text)}"
  if isinstance(error, (OSError, SyntaxError)) or "config file" in text.lower():
    cause = error.__cause__ or error.__context__
    detail = base.one_line(text)
    if isinstance(cause, SyntaxError) or isinstance(error, SyntaxError):
      syntax = cause if isinstance(cause, SyntaxError) else error
      detail = f"{syntax.filename}:{syntax.lineno}: {syntax.msg}"
    return f"cannot load the --config file: {_ERRNO.sub('', detail)}"
  if isinstance(error, (AttributeError, KeyError)):
    text = _unquote(error)
    name, _, hint = text.partition("\n")
    return (f"bad config override: the config has no field {name.strip(chr(39))!r}"
            + (f" ({hint.strip()})" if hint.strip() else "")
            + "; the fields are research/run_config.py's defaults")
  return f"bad config override: {' '.join(_unquote(error).split())}"


def _raised_in_get_config(error: BaseException) -> bool:
  """Whether the config file's own get_config raised it (not the loader or an override)."""
  for e in (error, error.__cause__, error.__context__):
    tb = e.__traceback__ if e is not None else None
    while tb is not None:
      if tb.tb_frame.f_code.co_name == "get_config":
        return True
      tb = tb.tb_next
  return False


def _unquote(error: Exception) -> str:
  text = str(error.args[0] if error.args else error)
  # ml_collections re-raises a KeyError as AttributeError(KeyError), whose text
  # is the repr of a repr: unwrap the quoting layers.
  while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  return str(text)


def define_distributed_flags(fv: flags.FlagValues) -> None:
  """--coordinator / --num_processes / --process_id / --distributed, for commands
  that train on several processes (train, finetune)."""
  f = dict(flag_values=fv)
  flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for a multi-process"
                      " run (every process gets the same value)", **f)
  flags.DEFINE_integer("num_processes", None, "processes in the run (with --coordinator)",
                       **f)
  flags.DEFINE_integer("process_id", None, "this process, 0 .. num_processes-1", **f)
  flags.DEFINE_integer("coordinator_timeout", 300, "seconds to wait for the coordinator"
                       " and the other processes before giving up", **f)
  flags.DEFINE_bool("distributed", False, "join a multi-process run found by JAX's cluster"
                    " auto-detection (SLURM, Cloud TPU, ...) instead of --coordinator", **f)


def start_distributed(f: flags.FlagValues) -> None:
  """Joins the multi-process run the flags describe (nothing without them)."""
  parallel.initialize(f.coordinator, f.num_processes, f.process_id,
                      f.coordinator_timeout, auto=f.distributed)


def write_json(record, path) -> Path:
  """Writes `record` as JSON to `path` atomically: a reader never sees half a file."""
  path = Path(path)
  partials.publish(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
  return path


def write_lines(lines, path) -> Path:
  """One line each (newlines inside a line become spaces), atomically."""
  partials.publish(path, "".join(line.replace("\n", " ") + "\n" for line in lines))
  return Path(path)


def write_evaluation(result: dict, path) -> list[Path]:
  """An evaluation record (research.training.eval_loop.evaluate_run) as JSON at
  `path`, and each of its "outputs" beside it: a list one item a line in
  <path stem>.<name>.txt, a dict as JSON in <path stem>.<name>.json (e.g.
  SQuAD's predictions.json). Returns the paths, the record's first."""
  path = Path(path)
  outputs = result.pop("outputs", {})
  written = [write_json(result, path)]
  for name, value in outputs.items():
    if isinstance(value, dict):
      written.append(write_json(value, path.with_suffix(f".{name}.json")))
    else:
      written.append(write_lines(value, path.with_suffix(f".{name}.txt")))
  return written


EVAL_DIR = "eval"


def evaluation_path(workdir, step: int, data: str | None = None) -> Path:
  """DIR/eval/step_<N>.json, or step_<N>-<data name>.json for other data."""
  suffix = ""
  if data is not None:
    suffix = "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data).name.replace("*", "all"))
  return Path(workdir) / EVAL_DIR / f"step_{step}{suffix}.json"


def format_evaluation(result: dict) -> str:
  """An evaluation record's headline and its objective's metrics, rounded and labelled."""
  m = result["metrics"]
  return (f"{result['workdir']} step {result['step']} ({result['objective']}) on"
          f" {result['data']}, {m['batches']} batches:\n  "
          + eval_loop.format_summary(m, result["objective"])
          + "".join("\n" + line for line in result.get("attention", [])))
