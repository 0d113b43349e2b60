"""One trainer per workdir: an advisory lock on `<workdir>/train.lock`.

The lock is an exclusive `fcntl.flock` held for the whole run, so the
operating system drops it the moment the holder dies, however it dies; the
file also records the holder (pid, host, start time) for the messages. A
second trainer on the same workdir fails at once with one line naming the
holder; a lock file left by a dead trainer is taken over, saying so.
flock is per host: trainers on different hosts sharing a network file system
are not kept apart (only process 0 of a multi-process run takes the lock).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

LOCK_FILE = "train.lock"


class WorkdirLock:
  """with WorkdirLock(workdir): ...  (ValueError if another trainer holds it)."""

  def __init__(self, workdir, progress: bool = True):
    self.path = Path(workdir) / LOCK_FILE
    self.progress = progress
    self._file = None

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    file = open(self.path, "a+")
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(self.path)
      file.close()
      raise ValueError(f"{self.path.parent} is in use by another trainer ({holder});"
                       " wait for it to finish or use another --workdir.") from None
    file.seek(0)
    previous = file.read().strip()
    if previous and self.progress:
      print(f"taking over {self.path} from a trainer that did not exit cleanly"
            f" ({_describe(self.path)})", file=sys.stderr)
    file.seek(0)
    file.truncate()
    file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.datetime.now().isoformat(timespec="seconds")}))
    file.flush()
    self._file = file

  def release(self) -> None:
    if self._file is None:
      return
    # Empty before unlocking: a file with content is the sign of an unclean exit.
    self._file.seek(0)
    self._file.truncate()
    self._file.flush()
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _describe(path: Path) -> str:
  try:
    holder = json.loads(path.read_text() or "{}")
  except (OSError, json.JSONDecodeError):
    return "holder unknown"
  if not holder:
    return "holder unknown"
  return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
