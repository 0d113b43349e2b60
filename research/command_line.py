"""What every fusedlm command shares: flags with underscores, one error path,
quiet logging, and JSON written atomically.

  if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "...")
    command_line.run(_main, "research.evaluate")

A user's mistake (a missing run, a bad flag value, a file that does not fit,
a typo in a `--config.x=...` override) is printed as one line,
`<command>: error: <message>`, and the command exits with status 2 (absl's
own errors for undefined or missing flags exit 1). In the library those
mistakes are FileNotFoundError or ValueError; anything else is a bug and
keeps its traceback, as does every error under `--debug`.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path
from typing import Callable

USAGE_ERROR = 2  # exit status of a user's mistake


def fail(command: str, message: str):
  print(f"{command}: error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def run(body: Callable[[], None], command: str) -> None:
  """absl's app.run of `body()` (which reads absl.flags.FLAGS) with the shared
  error path; positional arguments are refused."""
  from absl import app, flags, logging  # pylint: disable=import-outside-toplevel
  flags.DEFINE_bool("debug", False, "show the full traceback of every error")

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.IllegalFlagValueError as e:
      # A bad value, or an error while loading the config file (config_flags
      # wraps the traceback into the message): its last line says what.
      if "--debug" in argv:
        raise
      fail(command, _last_line(str(e)))
    except flags.Error as e:  # an undefined or missing flag: absl's own wording
      print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see"
            " help on flags.", file=sys.stderr)
      sys.exit(1)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      # ml_collections' config_flags applies --config.x overrides while parsing
      # and raises these, many frames deep, for a key the config lacks.
      if "--debug" in argv:
        raise
      fail(command, f"bad config override: {_override_message(e)}")

  def main(argv):
    if len(argv) > 1:
      fail(command, f"unexpected arguments {argv[1:]}; every input is a --flag.")
    # app.run logs INFO (JAX's backend probe, every Orbax save step).
    logging.set_verbosity(logging.WARNING)
    try:
      body()
    except (FileNotFoundError, ValueError) as e:
      if flags.FLAGS.debug:
        raise
      fail(command, str(e))

  app.run(main, flags_parser=parse)


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else text


def _override_message(error: Exception) -> str:
  text = str(error.args[0] if error.args else error)
  # ml_collections re-raises a KeyError as AttributeError(KeyError), whose text
  # is the repr of a repr: unwrap the quoting layers.
  while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  if isinstance(error, (AttributeError, KeyError)):
    name, _, hint = text.partition("\n")
    return (f"the config has no field {name.strip(chr(39))!r}"
            + (f" ({hint.strip()})" if hint.strip() else "")
            + "; the fields are research/run_config.py's defaults")
  return " ".join(text.split())


def define_distributed_flags() -> None:
  """--coordinator / --num_processes / --process_id / --distributed, for commands
  that train on several processes (research.train, research.finetune)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for a multi-process"
                      " run (every process gets the same value)")
  flags.DEFINE_integer("num_processes", None, "processes in the run (with --coordinator)")
  flags.DEFINE_integer("process_id", None, "this process, 0 .. num_processes-1")
  flags.DEFINE_integer("coordinator_timeout", 300, "seconds to wait for the coordinator"
                       " and the other processes before giving up")
  flags.DEFINE_bool("distributed", False, "join a multi-process run found by JAX's cluster"
                    " auto-detection (SLURM, Cloud TPU, ...) instead of --coordinator")


def start_distributed() -> None:
  """Joins the multi-process run the flags describe (nothing without them)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from research import parallel  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  parallel.initialize(f.coordinator, f.num_processes, f.process_id,
                      f.coordinator_timeout, auto=f.distributed)


def write_json(record, path) -> Path:
  """Writes `record` as JSON to `path` atomically: a reader never sees half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
  partial.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
  os.replace(partial, path)
  return path
