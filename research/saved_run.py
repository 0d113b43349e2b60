"""A finished (or interrupted) run, reopened from its workdir for evaluation and reuse.

  run = open_run("runs/tiny_gpt")            # config.json, tokenizer/, checkpoints/
  step, params = run.restore_params()        # newest step; parameters only
  model = models.build_model(run.model_cfg)

Everything comes from the workdir itself (see `research.checkpoint` for the
layout): the model is rebuilt from the resolved ModelConfig that training
recorded in config.json, the tokenizer is the run's own, and only the `params`
subtree of the saved TrainState is read (Orbax partial restore), so the
optimizer state is never loaded and a checkpoint written by any optimizer, on
any number of devices, restores the same way. The checkpoint folder is opened
read-only: nothing here can change or delete a checkpoint.
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

from research import checkpoint as ckpt_lib
from research import models
from research.data import Tokenizer, load_tokenizer
from research.model_config import ModelConfig



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
    return self.workdir / ckpt_lib.CHECKPOINT_DIR

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
  config_path = workdir / ckpt_lib.CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(
        f"{workdir} has no {ckpt_lib.CONFIG_FILE}: not a fusedlm workdir (research.train"
        f" writes {ckpt_lib.CONFIG_FILE}, {ckpt_lib.TOKENIZER_DIR}/ and"
        f" {ckpt_lib.CHECKPOINT_DIR}/ there).")
  record = json.loads(config_path.read_text())
  model_dict = record.pop(ckpt_lib.RESOLVED_MODEL, None)
  if model_dict is None:
    raise ValueError(f"{config_path} lacks {ckpt_lib.RESOLVED_MODEL!r}, the model the checkpoints"
                     " were written for; was it written by research.train?")
  labels = record.pop(ckpt_lib.RESOLVED_LABELS, None)
  tokenizer_dir = workdir / ckpt_lib.TOKENIZER_DIR
  if not tokenizer_dir.is_dir():
    raise FileNotFoundError(f"{workdir} has no {ckpt_lib.TOKENIZER_DIR}/ folder: the run's"
                            " tokenizer is needed to read and write text.")
  return SavedRun(
      workdir=workdir,
      config=ml_collections.ConfigDict(record),
      model_cfg=ModelConfig.from_dict(model_dict),
      tokenizer=load_tokenizer(tokenizer_dir),
      label_names=tuple(labels) if labels is not None else None,
      steps=checkpoint_steps(workdir / ckpt_lib.CHECKPOINT_DIR),
  )


def checkpoint_steps(directory: Path) -> tuple[int, ...]:
  """Steps of the finished checkpoints in `directory` (Orbax skips temporaries)."""
  if not directory.is_dir():
    return ()
  return tuple(sorted(_read_only_manager(directory).all_steps()))


def restore_params(directory: Path, step: int, model_cfg: ModelConfig):
  """The `params` subtree of the TrainState saved at `step`, as numpy arrays."""
  target = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
  item = {"params": target}
  restore_args = jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  path = directory / str(step)
  try:
    restored = _read_only_manager(directory).restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))
  except Exception as e:  # Orbax raises several types for missing files and trees.
    raise ValueError(
        f"cannot restore the parameters of checkpoint {path}: it is incomplete or"
        f" does not fit the model in {directory.parent / ckpt_lib.CONFIG_FILE}"
        f" ({type(e).__name__}: {e})") from e
  params = restored["state"]["params"]
  try:
    ckpt_lib.check_shapes(params, target)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return params


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
