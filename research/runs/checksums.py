"""Checksums of a finished checkpoint, so damaged bytes are found before they are used.

Orbax writes a checkpoint step atomically (a temporary folder renamed when
complete) but never checks its bytes again: a flipped bit in a data file
restores as a wrong number, or NaN, without a word. So once a step is
final, `write_manifest` records the size and SHA-256 of every file under it
in `<step>/fusedlm_checksums.json` (written atomically), and `verify` compares
them before any restore. A checkpoint written before manifests existed
verifies as "unverified" rather than failing.

  write_manifest(Path("runs/x/checkpoints/300"))
  verify(Path("runs/x/checkpoints/300"))   # DamagedCheckpointError if changed
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "fusedlm_checksums.json"
_CHUNK = 1 << 22


class DamagedCheckpointError(ValueError):
  """A checkpoint's files differ from its recorded checksums."""


def _files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*")
                if p.is_file() and p.name != MANIFEST and not p.name.endswith(".partial"))


def _digest(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def has_manifest(step_dir: Path) -> bool:
  return (Path(step_dir) / MANIFEST).is_file()


def write_manifest(step_dir: Path) -> None:
  """Records {relative path: [bytes, sha256]} of every file of a finished step."""
  step_dir = Path(step_dir)
  record = {str(p.relative_to(step_dir)): [p.stat().st_size, _digest(p)]
            for p in _files(step_dir)}
  partial = step_dir / f"{MANIFEST}.{os.getpid()}.partial"
  partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  os.replace(partial, step_dir / MANIFEST)


def verify(step_dir: Path) -> bool:
  """True if every recorded file is there with its size and hash; False if the
  step has no manifest (unverified). DamagedCheckpointError names what differs."""
  step_dir = Path(step_dir)
  manifest = step_dir / MANIFEST
  if not manifest.is_file():
    return False
  try:
    record = json.loads(manifest.read_text())
  except json.JSONDecodeError as e:
    raise DamagedCheckpointError(f"{manifest} is not valid JSON ({e})") from e
  bad = []
  for name, (size, digest) in sorted(record.items()):
    path = step_dir / name
    if not path.is_file():
      bad.append(f"{name} is missing")
    elif path.stat().st_size != size:
      bad.append(f"{name} has {path.stat().st_size} bytes, not {size}")
    elif _digest(path) != digest:
      bad.append(f"{name} has changed (SHA-256 differs)")
  if bad:
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise DamagedCheckpointError(
        f"checkpoint {step_dir} is damaged or incomplete: {'; '.join(bad[:5])}{more}")
  return True
