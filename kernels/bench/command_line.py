"""The command-line convention of every fusedlm command: absl flags, one error path.

  def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "...", flag_values=fv)

  def main(argv=None):
    command_line.run("fusedlm evaluate", define_flags, _main, argv, doc=__doc__)

Each run parses its arguments into a fresh `absl.flags.FlagValues` (not the
global FLAGS), so commands can be called in one process one after another
(`fusedlm` dispatches to them, tests call them) and `--help` prints the
command's own flags.

A user's mistake (an unknown or missing flag, a bad flag value, a setting that
cannot run here) is printed as one line, `<command>: error: <message>`, and
the command exits with status 2. In the library those mistakes are ValueError,
FileNotFoundError or a command's own error types; anything else is a bug and
keeps its traceback, as does every error under `--debug`.

The research commands share this module (research may use kernels; kernels
knows nothing of research); `research.runs.command_line` adds what only they
need (config-file errors, multi-process flags, atomic JSON).
"""

from __future__ import annotations

import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import flags

USAGE_ERROR = 2  # exit status of a user's mistake
HELP = ("-h", "--help", "--helpshort", "--helpfull")
_EXCEPTION_PREFIX = re.compile(r"^(flag --[^:]*: )?\w*(Error|Exception): ")


def fail(command: str, message: str) -> NoReturn:
  print(f"{command}: error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def one_line(text: str) -> str:
  """The last non-empty line of a (possibly multi-line) message, stripped."""
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[-1] if lines else str(text)


def run(command: str, define: Callable[[flags.FlagValues], None],
        body: Callable[[flags.FlagValues], None], argv: Sequence[str] | None = None, *,
        doc: str | None = None, errors: tuple[type[Exception], ...] = (),
        parse_error: Callable[[Exception], str] | None = None) -> None:
  """Parses `argv` (default: sys.argv's, after the program name) and runs `body`.

  define: defines the command's flags on the FlagValues it is given.
  body: the command, reading its parsed flags.
  doc: the usage text `--help` prints above the flags (the module docstring).
  errors: exception types besides ValueError and FileNotFoundError that are a
    user's mistake.
  parse_error: turns an exception a flag parser raised while parsing (e.g.
    ml_collections applying `--config.x=...`) into the one-line message;
    default: its last line. Positional arguments are refused.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  define(fv)
  flags.DEFINE_bool("debug", False, "show the full traceback of every error",
                    flag_values=fv)
  if any(arg in HELP for arg in argv):
    print(help_text(command, fv, doc))
    return
  debug = "--debug" in argv or "--debug=true" in argv
  try:
    rest = fv([command, *argv])
  except flags.Error as e:  # unknown, missing or malformed flags
    if debug:
      raise
    fail(command, flag_error(command, e))
  except Exception as e:  # pylint: disable=broad-except
    # Flag parsers that load files (ml_collections' config files, whose own
    # code may raise anything) fail on the user's input: one line too.
    if debug:
      raise
    fail(command, parse_error(e) if parse_error else one_line(e))
  if len(rest) > 1:
    fail(command, f"unexpected arguments {rest[1:]}; every input is a --flag"
                  f" (see {command} --help).")
  _quiet_logging()
  try:
    body(fv)
  except (ValueError, FileNotFoundError, *errors) as e:
    if fv.debug:
      raise
    fail(command, one_line(e) if isinstance(e, flags.Error) else str(e))


def flag_error(command: str, error: flags.Error) -> str:
  """One line for absl's parse error: a missing, unknown or malformed flag."""
  text = one_line(error)
  missing = re.search(r"Flag --(\w+) must have a value other than None", text)
  if missing:
    return f"missing --{missing.group(1)} (see {command} --help)."
  if isinstance(error, flags.UnrecognizedFlagError):
    return f"{text} (see {command} --help)."
  # A parser's own exception, quoted by absl ("...: ValueError: why"): the why.
  return _EXCEPTION_PREFIX.sub("", text)


def help_text(command: str, fv: flags.FlagValues, doc: str | None) -> str:
  """`command --help`: the usage text, then every flag with its help and default."""
  lines = [f"usage: {command} [--flag=value ...]", ""]
  if doc:
    lines += [doc.strip(), ""]
  lines.append("flags:")
  for flag in sorted(fv._flags().values(), key=lambda f: f.name):  # pylint: disable=protected-access
    if flag.name in ("help", "helpfull", "helpshort", "helpxml"):
      continue
    default = "" if flag.default is None else f" (default: {flag.default_as_str})"
    lines.append(f"  --{flag.name}: {flag.help}{default}")
  return "\n".join(lines)


def _quiet_logging() -> None:
  """absl logs at WARNING and above (JAX's backend probe and Orbax's every save
  step log INFO); absl's global FLAGS, which its logging consults, count as
  parsed, since each command parses its own."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)


def ints(name: str, values: Sequence[str] | None) -> tuple[int, ...] | None:
  """A comma-list flag's items as ints; ValueError names the flag."""
  if values is None:
    return None
  try:
    return tuple(int(x) for x in values)
  except ValueError:
    raise ValueError(f"--{name} takes a comma list of integers, got"
                     f" {','.join(values)!r}.") from None


def names(name: str, values: Sequence[str], choices: Sequence[str]) -> tuple[str, ...]:
  """A comma-list flag's items, each one of `choices`; ValueError names the rest."""
  unknown = [x for x in values if x not in choices]
  if unknown:
    raise ValueError(f"--{name}: unknown {', '.join(unknown)}; choose from"
                     f" {', '.join(choices)}.")
  return tuple(values)
