"""What every fusedlm command shares: flags with underscores, one error path,
quiet logging, and JSON written atomically.

  if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "...")
    command_line.run(_main, "research.evaluate")

A user's mistake (a missing run, a bad flag value, a file that does not fit)
is a FileNotFoundError or ValueError from the library; the command prints it
as one line, `<command>: error: <message>`, and exits with status 2 (absl's
own flag errors exit 1). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

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
  from absl import app, logging  # pylint: disable=import-outside-toplevel

  def main(argv):
    if len(argv) > 1:
      fail(command, f"unexpected arguments {argv[1:]}; every input is a --flag.")
    # app.run logs INFO (JAX's backend probe, every Orbax save step).
    logging.set_verbosity(logging.WARNING)
    try:
      body()
    except (FileNotFoundError, ValueError) as e:
      fail(command, str(e))

  app.run(main)


def write_json(record, path) -> Path:
  """Writes `record` as JSON to `path` atomically: a reader never sees half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
  partial.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
  os.replace(partial, path)
  return path
