"""The command-line convention of the kernels' commands, as research's: absl
flags with underscores, and one error path.

kernels/ knows nothing of research/, so these few lines repeat
`research.command_line.run` rather than import it. A user's mistake (a bad
flag value, a setting that cannot run here) is a ValueError (or one of the
command's own error types); the command prints it as one line,
`<command>: error: <message>`, and exits with status 2. absl's own flag
errors (an unknown flag, a value of the wrong type) exit 1 with absl's
message. Anything else is a bug and keeps its traceback.

Flags are defined by a function of the command (`define_flags(flag_values)`),
not at import, so that two commands' modules can be imported side by side
(tests) and each parsed into its own `absl.flags.FlagValues`.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

USAGE_ERROR = 2  # exit status of a user's mistake


def fail(command: str, message: str):
  print(f"{command}: error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def run(body: Callable[[], None], command: str,
        argv: Sequence[str] | None = None,
        errors: tuple[type[Exception], ...] = ()) -> None:
  """absl's app.run of `body()`, which reads the global absl.flags.FLAGS.

  argv: the arguments after the program name (default: sys.argv's).
  errors: exception types besides ValueError that are a user's mistake.
  Positional arguments are refused; every input is a --flag.
  """
  from absl import app, logging  # pylint: disable=import-outside-toplevel

  def main(args):
    if len(args) > 1:
      fail(command, f"unexpected arguments {args[1:]}; every input is a --flag.")
    logging.set_verbosity(logging.WARNING)
    try:
      body()
    except (ValueError, *errors) as e:
      fail(command, str(e))

  app.run(main, argv=None if argv is None else [command, *argv])


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
