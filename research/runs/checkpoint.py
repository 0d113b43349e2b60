"""Training's checkpoints: Orbax saves that are checksummed, pruned safely and restored.

`Checkpointer` saves the TrainState every N steps (async if asked), keeps the
newest K and restores the whole state to resume exactly, falling back past a
damaged step; `restore_tree` is the one restore (an Orbax PyTreeRestore),
whole or partial; `restore_params` reads only the `params` subtree, through a
read-only manager that cannot change or delete a checkpoint (what
`runs.saved_run` uses to reopen a finished run).

Orbax writes each step to "<step>.orbax-checkpoint-tmp-*" and renames it when
complete; listings skip such temporaries, so an interrupted save is never the
one restored. The run files beside the checkpoints (config.json, tokenizer/)
are `runs.run_files`'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from fusedlm.research import models
from fusedlm.research.models.config import ModelConfig
from fusedlm.research.runs import checksums, parallel

CHECKPOINT_DIR = "checkpoints"
STATE_DIGESTS = "state_sha256"  # the extra item's leaf checksums (checksums.leaf_digests)


class NonFiniteStateError(FloatingPointError):
  """A state with NaN or Inf values was about to be saved; it never is."""


class Checkpointer:
  """Training's checkpoints: a save every `every` steps (async if asked), the
  newest `keep` kept, every kept step checksummed, and a restore that falls back
  past damaged steps.

  Keep-N is ours, not Orbax's: an old step is renamed out of the listing
  (`<step>.deleting`) before its files are removed, so a kill during clean-up
  never leaves a half-deleted step that looks complete, and the next save
  catches up with whatever a killed run left. Leftovers of killed saves and
  deletions are removed when the trainer opens the folder.
  """

  def __init__(self, workdir, every: int, keep: int, use_async: bool = True):
    self.workdir = Path(workdir).absolute()
    self.directory = self.workdir / CHECKPOINT_DIR
    self.keep = keep
    self.directory.mkdir(parents=True, exist_ok=True)
    # Every process opens the manager (Orbax saves are collective); only
    # process 0 changes the folder, and the others wait for it (barrier).
    self.primary = parallel.is_primary()
    if self.primary:
      for leftover in self.directory.glob(f"*{_DELETING}"):
        shutil.rmtree(leftover, ignore_errors=True)
    parallel.barrier("fusedlm:checkpoint-open")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, save_interval_steps=every,
            enable_async_checkpointing=use_async, create=True,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, host_state, force: bool = False, extra: dict | None = None) -> bool:
    """Saves host_state (numpy leaves) at `step` when due (or forced).

    extra: a small JSON record saved beside the state (the trainer's partial
    log window); the SHA-256 of every leaf joins it (checksums.leaf_digests),
    committed with the arrays. NonFiniteStateError if any value of the state
    is NaN or Inf.
    """
    bad = _non_finite_leaves(host_state)
    if bad:
      raise NonFiniteStateError(
          f"the state at step {step} holds non-finite values ({', '.join(bad[:5])});"
          f" it was not saved. The newest checkpoint is step {self.newest_intact_label()}"
          f" in {self.directory}.")
    self.finish()  # the previous async save: checksums, then keep-N
    return self.manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(host_state),
            extra=ocp.args.JsonSave({**(extra or {}),
                                     STATE_DIGESTS: checksums.leaf_digests(host_state)})),
        force=force)

  def newest_intact_label(self) -> str:
    steps = self.all_steps()
    return str(steps[-1]) if steps else "none"

  def restore(self, step: int, abstract_state):
    """The whole state saved at `step`, on the host; ValueError if it is damaged
    or its tree differs."""
    return restore_tree(self.manager, step, abstract_state)

  def restore_latest(self, abstract_state, progress: bool = True):
    """(step, state, extra) of the newest intact checkpoint, or None if there is none.

    A damaged step (checksums differ, unreadable, or non-finite values) is
    renamed `<step>.damaged-<time>` (kept for inspection, out of the listing)
    and the next newest is tried, saying so on stderr. A checkpoint that does
    not fit the config is not damaged: that ValueError propagates.
    """
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        extra = self._extra(step)
        state = restore_tree(self.manager, step, abstract_state)
        checksums.check_leaves(state, extra.get(STATE_DIGESTS), self.directory / str(step))
        bad = _non_finite_leaves(state)
        if bad:
          raise checksums.DamagedCheckpointError(
              f"checkpoint {self.directory / str(step)} holds non-finite values"
              f" ({', '.join(bad[:3])})")
      except checksums.DamagedCheckpointError as e:
        damaged.append(step)
        aside = self.directory / f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.primary:
          os.replace(self.directory / str(step), aside)
        parallel.barrier(f"fusedlm:checkpoint-damaged-{step}")
        self.manager.reload()
        if progress and self.primary:
          print(f"{e}; moved it to {aside.name} and falling back to the next newest"
                " checkpoint", file=sys.stderr)
        continue
      return step, state, extra
    if damaged:
      raise ValueError(f"every checkpoint in {self.directory} is damaged (steps"
                       f" {sorted(damaged)}, moved aside); refusing to start over silently."
                       " Move them away to train from scratch.")
    return None

  def _extra(self, step: int) -> dict:
    return read_extra(self.manager, step)

  def finish(self):
    """Waits for a save in flight, checksums finished steps, prunes to `keep`."""
    self.manager.wait_until_finished()
    steps = self.all_steps()
    if self.primary:
      for step in steps:
        if not checksums.has_manifest(self.directory / str(step)):
          checksums.write_manifest(self.directory / str(step))
      for step in steps[:-self.keep]:
        aside = self.directory / f"{step}{_DELETING}"
        os.replace(self.directory / str(step), aside)  # out of the listing first
        shutil.rmtree(aside)
    parallel.barrier("fusedlm:checkpoint-finish")
    if len(steps) > self.keep:
      self.manager.reload()

  wait = finish

  def close(self):
    self.finish()
    # Orbax (0.11) cleans up interrupted saves' temporaries in a background
    # thread started with the manager, which save() waits for and close() does
    # not: a manager closed before its first save (a run refused at set-up)
    # would make that thread fail with a traceback under our one-line error.
    # The waiting method is private; without it (another Orbax), close as is.
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self.manager.close()


_DELETING = ".deleting"


def _non_finite_leaves(tree) -> list[str]:
  """Paths of floating-point leaves holding NaN or Inf."""
  bad = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
      bad.append(jax.tree_util.keystr(path))
  return bad


def restore_tree(manager: ocp.CheckpointManager, step: int, target, *,
                 partial: bool = False):
  """The tree saved at `step` as numpy arrays, shaped like `target`.

  target: a pytree of arrays or ShapeDtypeStructs (the TrainState, or a
  sub-tree such as {"params": ...} with partial=True, which reads only those
  leaves). The step's checksums are verified first (DamagedCheckpointError,
  a ValueError, if its bytes changed); ValueError, naming the checkpoint, when
  it is incomplete or its tree or shapes differ from target's.
  """
  path = Path(manager.directory) / str(step)
  checksums.verify(path)
  restore_args = jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=partial)))
  except Exception as e:  # Orbax raises several types for missing files and trees.
    if "DATA_LOSS" in str(e):  # the storage layer's own checksums (OCDBT's CRC-32C)
      raise checksums.DamagedCheckpointError(
          f"checkpoint {path} is damaged: its storage reports lost or changed data"
          f" ({str(e).splitlines()[0][:300]})") from e
    raise ValueError(f"cannot restore checkpoint {path}: it is incomplete or does not"
                     f" fit the config ({type(e).__name__}: {e})") from e
  state = restored["state"]
  try:
    check_shapes(state, target)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return state


def check_shapes(restored, abstract_state):
  """ValueError naming each leaf whose shape differs from the config's."""
  bad = []
  flat_r = jax.tree_util.tree_leaves_with_path(restored)
  flat_a = dict(jax.tree_util.tree_leaves_with_path(abstract_state))
  for path, leaf in flat_r:
    want = flat_a.get(path)
    if want is not None and tuple(np.shape(leaf)) != tuple(want.shape):
      bad.append(f"{jax.tree_util.keystr(path)}: saved {np.shape(leaf)}, config {want.shape}")
  if bad:
    raise ValueError("checkpoint does not fit the config: " + "; ".join(bad[:10]))


def checkpoint_steps(directory: Path) -> tuple[int, ...]:
  """Steps of the finished checkpoints in `directory` (Orbax skips temporaries)."""
  if not directory.is_dir():
    return ()
  with _read_only_manager(directory) as manager:
    return tuple(sorted(manager.all_steps()))


def read_extra(manager: ocp.CheckpointManager, step: int) -> dict:
  """A step's JSON item ({} for one saved before the trainer wrote one);
  DamagedCheckpointError when it is unreadable."""
  path = Path(manager.directory) / str(step)
  if not (path / "extra").is_dir():
    return {}
  try:
    return dict(manager.restore(
        step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"])
  except Exception as e:  # Orbax wraps the JSON error in several types
    raise checksums.DamagedCheckpointError(
        f"checkpoint {path} is damaged: its extra record is unreadable"
        f" ({type(e).__name__}: {e})") from e


def restore_params(directory: Path, step: int, model_cfg: ModelConfig):
  """The `params` subtree of the TrainState saved at `step`, as numpy arrays,
  checked against the leaf checksums saved with it."""
  item = {"params": models.abstract_params(model_cfg)}
  try:
    with _read_only_manager(directory) as manager:
      digests = read_extra(manager, step).get(STATE_DIGESTS)
      params = restore_tree(manager, step, item, partial=True)
      checksums.check_leaves(params, digests, Path(directory) / str(step))
      return params["params"]
  except checksums.DamagedCheckpointError:
    raise
  except ValueError as e:
    raise ValueError(f"{e}; the model is the one in {directory.parent}'s config.json") from e


@contextlib.contextmanager
def _read_only_manager(directory: Path):
  """A read-only CheckpointManager, closed after use (an unclosed one leaves
  Orbax's event loop to be torn down noisily at exit)."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # Orbax warns that the folder is read-only: it is meant to be.
  try:
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0))
  finally:
    absl_logger.setLevel(level)
  try:
    yield manager
  finally:
    manager.close()


def incomplete_note(directory: Path) -> str:
  """' (unfinished saves: ...)' when interrupted temporaries lie in `directory`."""
  if not directory.is_dir():
    return f" ({directory} does not exist)"
  partial = sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)
  damaged = sorted(p.name for p in directory.iterdir() if ".damaged-" in p.name)
  note = f" (unfinished saves, ignored: {partial})" if partial else ""
  return note + (f" (damaged, moved aside: {damaged})" if damaged else "")
