"""Checksums of a finished checkpoint, so damaged bytes are found before they are used.

Orbax writes a checkpoint step atomically (a temporary folder renamed when
complete) but never checks its bytes again: a flipped bit in a data file
restores as a wrong number, or NaN, without a word. So once a step is
final, `write_manifest` records the size and SHA-256 of every file under it
in `<step>/fusedlm_checksums.json` (written atomically), and `verify` compares
them before any restore. A checkpoint written before manifests existed
verifies as "unverified" rather than failing.

The manifest is written once the asynchronous save is done, so a kill can
leave the newest step without one. The arrays themselves are therefore
checksummed too, before the save, into the step's own JSON item (committed
with the arrays in Orbax's one rename): `leaf_digests` records the SHA-256 of
every leaf's bytes and `check_leaves` compares the restored arrays with them,
so a changed byte is found whether or not the step has a manifest.

  write_manifest(Path("runs/x/checkpoints/300"))
  verify(Path("runs/x/checkpoints/300"))   # DamagedCheckpointError if changed
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np

from fusedlm.research.data import partials

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
  partials.publish(step_dir / MANIFEST, json.dumps(record, indent=1, sort_keys=True) + "\n")


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


def _leaf_name(path) -> str:
  """A tree path as "params/layer_0/kernel", the same for a TrainState and the
  {"params": ...} dict of a partial restore."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def _leaf_digest(leaf) -> str:
  array = np.ascontiguousarray(np.asarray(leaf))
  return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def leaf_digests(tree) -> dict[str, str]:
  """{leaf name: SHA-256 of its bytes} of a host tree (numpy leaves)."""
  return {_leaf_name(path): _leaf_digest(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_leaves(tree, digests: dict[str, str] | None, where: Path) -> None:
  """DamagedCheckpointError naming the leaves of a restored `tree` whose bytes
  differ from `digests` (leaves it lacks are not checked; None: a step saved
  before digests were recorded, unchecked)."""
  if digests is None:
    return
  bad = [name for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
         if (name := _leaf_name(path)) in digests and _leaf_digest(leaf) != digests[name]]
  if bad:
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise DamagedCheckpointError(
        f"checkpoint {where} is damaged: the restored values of {', '.join(bad[:5])}{more}"
        " differ from the checksums recorded when it was saved")
