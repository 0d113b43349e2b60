"""Files and cache entries published atomically, and the leftovers of killed writers removed.

`publish(path, data)` writes one file the way every run file and JSON output
is written: into `<name>.<pid>.partial` beside it, flushed to disk (fsync),
renamed over the old one, and the folder synced, so a kill at any moment
leaves either the old file or the new one, whole; unchanged content is not
rewritten at all.

A cache entry (a tokenized split, a trained tokenizer) is written into
`<entry>.<pid>.partial` and renamed into place when complete, so a reader
never sees half of one. A writer killed before the rename leaves its
partial folder behind; `remove_stale` deletes those whose writer is no longer
alive on this host and that have not changed for a while (a writer on another
host sharing the folder keeps touching its files; the age guard spares it).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

STALE_SECONDS = 600.0


def partial_path(path: Path) -> Path:
  """Where this process writes `path` before publishing it."""
  return path.with_name(f"{path.name}.{os.getpid()}.partial")


def publish(path: str | os.PathLike, data: str | bytes) -> bool:
  """Writes `data` (text is UTF-8) to `path` atomically and durably; returns
  False, writing nothing, when the file already holds exactly that."""
  path = Path(path)
  raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
  try:
    if path.is_file() and path.stat().st_size == len(raw) and path.read_bytes() == raw:
      return False
  except OSError:
    pass  # unreadable: replace it
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = partial_path(path)
  with open(partial, "wb") as f:
    f.write(raw)
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, path)
  _sync_folder(path.parent)
  return True


def _sync_folder(folder: Path) -> None:
  """The rename itself reaches the disk (POSIX: fsync the directory)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # some file systems cannot sync a directory
  finally:
    os.close(fd)


def remove_stale(directory: Path, stale_seconds: float = STALE_SECONDS) -> list[Path]:
  """Deletes `*.<pid>.partial` entries of dead writers in `directory`; returns them."""
  removed = []
  if not directory.is_dir():
    return removed
  now = time.time()
  for path in directory.glob("*.partial"):
    pid = path.name.rsplit(".", 2)[-2] if path.name.count(".") >= 2 else ""
    if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
      continue
    if now - _newest_mtime(path) < stale_seconds:
      continue
    if path.is_dir():
      shutil.rmtree(path, ignore_errors=True)
    else:
      path.unlink(missing_ok=True)
    removed.append(path)
  return removed


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  return True


def _newest_mtime(path: Path) -> float:
  times = [path.stat().st_mtime]
  if path.is_dir():
    times += [p.stat().st_mtime for p in path.rglob("*")]
  return max(times)
