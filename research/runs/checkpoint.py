"""Run folders: writing and reading config.json, the tokenizer and the checkpoints.

Workdir layout (self-contained):
  DIR/config.json          the run config (JSON) plus the resolved ModelConfig
                           (and a classifier's label names); guards resumes
  DIR/tokenizer/           Tokenizer.save: the exact tokenizer of the run
  DIR/checkpoints/<step>/  Orbax checkpoints of the TrainState (step, params,
                           optimizer state, dropout RNG); the data position is
                           the step, since batch(step) is a pure function

Two users, one restore (`restore_tree`, an Orbax PyTreeRestore):
  * training (`Checkpointer`) saves every N steps, keeps the newest K and
    restores the whole TrainState to resume exactly;
  * everything that reopens a finished run (`open_run` -> `SavedRun`) reads
    only the `params` subtree (a partial restore), so the optimizer state is
    never loaded and a checkpoint written by any optimizer, on any number of
    devices, restores the same way, through a read-only manager that cannot
    change or delete a checkpoint.

Orbax writes each step to "<step>.orbax-checkpoint-tmp-*" and renames it when
complete; listings skip such temporaries, so an interrupted save is never the
one restored.

  run = open_run("runs/tiny_gpt")            # config.json, tokenizer/, checkpoints/
  step, params = run.restore_params()        # newest step; parameters only
  model = models.build_model(run.model_cfg)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fusedlm.research import models, run_config
from fusedlm.research.data import Tokenizer, load_tokenizer
from fusedlm.research.models.config import ModelConfig
from fusedlm.research.runs import checksums, parallel

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
# Keys config.json holds beside the run config: the ModelConfig the
# checkpoints were written for, and a classifier's label names (label i).
RESOLVED_MODEL = "resolved_model"
RESOLVED_LABELS = "resolved_label_names"


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
    log window). NonFiniteStateError if any value of the state is NaN or Inf.
    """
    bad = _non_finite_leaves(host_state)
    if bad:
      raise NonFiniteStateError(
          f"the state at step {step} holds non-finite values ({', '.join(bad[:5])});"
          f" it was not saved. The newest checkpoint is step {self.newest_intact_label()}"
          f" in {self.directory}.")
    self.finish()  # the previous async save: checksums, then keep-N
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(host_state),
                                      extra=ocp.args.JsonSave(extra or {})),
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
        state = restore_tree(self.manager, step, abstract_state)
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
      return step, state, self._extra(step)
    if damaged:
      raise ValueError(f"every checkpoint in {self.directory} is damaged (steps"
                       f" {sorted(damaged)}, moved aside); refusing to start over silently."
                       " Move them away to train from scratch.")
    return None

  def _extra(self, step: int) -> dict:
    if not (self.directory / str(step) / "extra").is_dir():
      return {}  # written before the trainer saved one
    return dict(self.manager.restore(
        step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"])

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


def write_run_files(workdir, config, tokenizer, model_cfg_dict: dict,
                    label_names=None) -> None:
  """config.json (+ the resolved ModelConfig and labels) and tokenizer/ beside the checkpoints."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  record = {**config.to_dict(), RESOLVED_MODEL: model_cfg_dict}
  if label_names is not None:
    record[RESOLVED_LABELS] = list(label_names)
  path = workdir / CONFIG_FILE
  partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
  partial.write_text(run_config.to_json(record))
  os.replace(partial, path)  # a reader never sees half a config
  tokenizer.save(workdir / TOKENIZER_DIR)


# Fields that change which tokens batch(step) holds: a resume with any of them
# changed would silently train on other data than the checkpoint's run.
DATA_FIELDS = ("data.corpus", "data.tokenizer", "data.vocab_size", "data.seq_len",
               "data.mask_prob", "data.whole_word_masking", "data.task",
               "data.validation", "data.validation_fraction", "data.text_field",
               "data.text_pair_field", "data.label_field", "data.target_file",
               "data.source_field", "data.target_field", "data.header", "data.too_long",
               "data.packing", "data.validation_target_file", "data.doc_stride",
               "data.max_query_len", "train.batch_size",
               "train.seed", "nsp", "objective", "optimizer.accumulation_steps")


def check_resumable(workdir, config, model_cfg_dict: dict, *,
                    allow_data_change: bool = False) -> None:
  """Refuses to resume when the saved model or the data the batches come from
  differ from the current config; names every differing field.

  The saved config.json holds the resolved ModelConfig under RESOLVED_MODEL;
  data changes pass with allow_data_change (research.train --allow_data_change).
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  saved = read_config_json(path)
  saved_model = saved.get(RESOLVED_MODEL)
  # A field added to ModelConfig since the run was saved holds its default there.
  current_model = ModelConfig.from_dict(model_cfg_dict).to_dict()
  saved_model = (ModelConfig.from_dict(saved_model).to_dict() if saved_model is not None
                 else current_model)
  diffs = run_config.diff_model(saved_model, current_model)
  if diffs:
    raise ValueError(
        f"the checkpoint in {workdir} was written for a different model; refusing"
        " to resume. Differing model fields (saved -> current): " + "; ".join(diffs)
        + ". Use a new --workdir or restore the config.")
  current = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  changed = []
  for field in DATA_FIELDS:
    old, new = _lookup(saved, field), _lookup(current, field)
    if old is not _MISSING and new is not _MISSING and old != new:
      changed.append(f"{field}: {old!r} -> {new!r}")
  if changed and not allow_data_change:
    raise ValueError(
        f"resuming {workdir} with different data would not continue the same run:"
        f" {'; '.join(changed)}. Restore those fields, use a new --workdir, or pass"
        " --allow_data_change to resume anyway.")


_MISSING = object()


def _lookup(tree: dict, dotted: str):
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return _MISSING
    tree = tree[key]
  return tree


def read_config_json(path: Path) -> dict:
  """config.json as a dict; ValueError naming the file when it is not JSON."""
  try:
    return json.loads(Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON (truncated or edited by hand?): {e}") from e


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """What a workdir holds.

  Attributes:
    workdir: the run's folder (absolute).
    config: the run config as config.json recorded it (resolved keys removed).
    model_cfg: the exact ModelConfig the checkpoints were written for.
    tokenizer: the run's own tokenizer.
    label_names: class names of a fine-tuned classifier (label i is
      label_names[i]); None for a pretraining run.
    steps: steps with a checkpoint, ascending.
  """

  workdir: Path
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  tokenizer: Tokenizer
  label_names: tuple[str, ...] | None
  steps: tuple[int, ...]

  @property
  def objective(self) -> str:
    return self.config.objective

  @property
  def checkpoint_dir(self) -> Path:
    return self.workdir / CHECKPOINT_DIR

  def resolve_step(self, step: int | None = None) -> int:
    """`step`, or the newest one; ValueError listing the steps that exist."""
    if not self.steps:
      raise ValueError(f"{self.checkpoint_dir} holds no complete checkpoint"
                       f"{_incomplete_note(self.checkpoint_dir)}; train first"
                       " (research.train writes one every checkpoint.every steps).")
    if step is None:
      return self.steps[-1]
    if step not in self.steps:
      raise ValueError(f"no checkpoint at step {step} in {self.checkpoint_dir}; the"
                       f" complete checkpoints are at steps {list(self.steps)}"
                       f"{_incomplete_note(self.checkpoint_dir)}.")
    return step

  def restore_params(self, step: int | None = None) -> tuple[int, Any]:
    """(step, the parameter tree as numpy arrays on the host).

    Raises:
      ValueError: no such step, or a checkpoint that is incomplete or does not
        fit config.json's model (each differing leaf named).
    """
    step = self.resolve_step(step)
    try:
      return step, restore_params(self.checkpoint_dir, step, self.model_cfg)
    except ValueError as e:
      others = [s for s in self.steps if s != step]
      raise ValueError(f"{e}. Other checkpoints in {self.checkpoint_dir}: steps"
                       f" {others or 'none'}.") from e


def open_run(workdir: str | os.PathLike) -> SavedRun:
  """Reads a workdir's config.json, tokenizer and checkpoint list (no arrays).

  Raises:
    FileNotFoundError: no such folder, or one without config.json / tokenizer/.
    ValueError: a config.json without the resolved model (not written by
      research.train or research.finetune).
  """
  workdir = Path(workdir).absolute()
  if not workdir.is_dir():
    raise FileNotFoundError(f"no run folder at {workdir}")
  config_path = workdir / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(
        f"{workdir} has no {CONFIG_FILE}: not a fusedlm workdir (research.train"
        f" writes {CONFIG_FILE}, {TOKENIZER_DIR}/ and"
        f" {CHECKPOINT_DIR}/ there).")
  record = read_config_json(config_path)
  model_dict = record.pop(RESOLVED_MODEL, None)
  if model_dict is None:
    raise ValueError(f"{config_path} lacks {RESOLVED_MODEL!r}, the model the checkpoints"
                     " were written for; was it written by research.train?")
  labels = record.pop(RESOLVED_LABELS, None)
  tokenizer_dir = workdir / TOKENIZER_DIR
  if not tokenizer_dir.is_dir():
    raise FileNotFoundError(f"{workdir} has no {TOKENIZER_DIR}/ folder: the run's"
                            " tokenizer is needed to read and write text.")
  return SavedRun(
      workdir=workdir,
      config=ml_collections.ConfigDict(record),
      model_cfg=ModelConfig.from_dict(model_dict),
      tokenizer=load_tokenizer(tokenizer_dir),
      label_names=tuple(labels) if labels is not None else None,
      steps=checkpoint_steps(workdir / CHECKPOINT_DIR),
  )


def checkpoint_steps(directory: Path) -> tuple[int, ...]:
  """Steps of the finished checkpoints in `directory` (Orbax skips temporaries)."""
  if not directory.is_dir():
    return ()
  with _read_only_manager(directory) as manager:
    return tuple(sorted(manager.all_steps()))


def restore_params(directory: Path, step: int, model_cfg: ModelConfig):
  """The `params` subtree of the TrainState saved at `step`, as numpy arrays."""
  item = {"params": models.abstract_params(model_cfg)}
  try:
    with _read_only_manager(directory) as manager:
      return restore_tree(manager, step, item, partial=True)["params"]
  except checksums.DamagedCheckpointError:
    raise
  except ValueError as e:
    raise ValueError(f"{e}; the model is the one in"
                     f" {directory.parent / CONFIG_FILE}") from e


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


def _incomplete_note(directory: Path) -> str:
  """' (unfinished saves: ...)' when interrupted temporaries lie in `directory`."""
  if not directory.is_dir():
    return f" ({directory} does not exist)"
  partial = sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)
  damaged = sorted(p.name for p in directory.iterdir() if ".damaged-" in p.name)
  note = f" (unfinished saves, ignored: {partial})" if partial else ""
  return note + (f" (damaged, moved aside: {damaged})" if damaged else "")
