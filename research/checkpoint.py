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

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from research import models, run_config
from research.data import Tokenizer, load_tokenizer
from research.models.config import ModelConfig

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
# Keys config.json holds beside the run config: the ModelConfig the
# checkpoints were written for, and a classifier's label names (label i).
RESOLVED_MODEL = "resolved_model"
RESOLVED_LABELS = "resolved_label_names"


class Checkpointer:
  """Saves every `every` steps (async if asked), keeps the last `keep`."""

  def __init__(self, workdir, every: int, keep: int, use_async: bool = True):
    self.workdir = Path(workdir).absolute()
    self.manager = ocp.CheckpointManager(
        self.workdir / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every,
            enable_async_checkpointing=use_async, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, host_state, force: bool = False) -> bool:
    """Saves host_state (numpy leaves) at `step` when due (or forced)."""
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(host_state)),
        force=force)

  def restore(self, step: int, abstract_state):
    """The whole state saved at `step`, on the host; ValueError if its tree differs."""
    return restore_tree(self.manager, step, abstract_state)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_tree(manager: ocp.CheckpointManager, step: int, target, *,
                 partial: bool = False):
  """The tree saved at `step` as numpy arrays, shaped like `target`.

  target: a pytree of arrays or ShapeDtypeStructs (the TrainState, or a
  sub-tree such as {"params": ...} with partial=True, which reads only those
  leaves). ValueError, naming the checkpoint, when it is incomplete or its
  tree or shapes differ from target's.
  """
  path = Path(manager.directory) / str(step)
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
  (workdir / CONFIG_FILE).write_text(run_config.to_json(record))
  tokenizer.save(workdir / TOKENIZER_DIR)


def check_compatible(workdir, model_cfg_dict: dict) -> None:
  """Refuses to resume when the saved model config differs from the current one.

  The saved config.json holds the resolved ModelConfig under RESOLVED_MODEL.
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  saved = json.loads(path.read_text()).get(RESOLVED_MODEL)
  if saved is None:
    return
  diffs = run_config.diff_model(saved, model_cfg_dict)
  if diffs:
    raise ValueError(
        f"the checkpoint in {workdir} was written for a different model; refusing"
        " to resume. Differing model fields (saved -> current): " + "; ".join(diffs)
        + ". Use a new --workdir or restore the config.")



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
  record = json.loads(config_path.read_text())
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
  return tuple(sorted(_read_only_manager(directory).all_steps()))


def restore_params(directory: Path, step: int, model_cfg: ModelConfig):
  """The `params` subtree of the TrainState saved at `step`, as numpy arrays."""
  item = {"params": models.abstract_params(model_cfg)}
  try:
    return restore_tree(_read_only_manager(directory), step, item, partial=True)["params"]
  except ValueError as e:
    raise ValueError(f"{e}; the model is the one in"
                     f" {directory.parent / CONFIG_FILE}") from e


def _read_only_manager(directory: Path) -> ocp.CheckpointManager:
  # A fresh manager per call: a manager that saved with StandardSave keeps that
  # handler and would refuse the partial PyTreeRestore used here.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # Orbax warns that the folder is read-only: it is meant to be.
  try:
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0))
  finally:
    absl_logger.setLevel(level)


def _incomplete_note(directory: Path) -> str:
  """' (unfinished saves: ...)' when interrupted temporaries lie in `directory`."""
  if not directory.is_dir():
    return f" ({directory} does not exist)"
  partial = sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)
  return f" (unfinished saves, ignored: {partial})" if partial else ""
