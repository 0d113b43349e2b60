"""Reopening a finished run: its config, model, tokenizer and checkpoints, read-only.

  run = open_run("runs/tiny_gpt")            # config.json, tokenizer/, checkpoints/
  step, params = run.restore_params()        # newest step; parameters only
  model = models.build_model(run.model_cfg)

Everything that reopens a run (evaluate, generate, fill-mask, translate,
fine-tuning's warm start) reads only the `params` subtree of a checkpoint (a
partial restore), so the optimizer state is never loaded and a checkpoint
written by any optimizer, on any number of devices, restores the same way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import ml_collections

from fusedlm.research.data import Tokenizer
from fusedlm.research.models.config import ModelConfig
from fusedlm.research.runs.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_steps,
    incomplete_note,
    restore_params,
)
from fusedlm.research.runs.run_files import (
    CONFIG_FILE,
    RESOLVED_LABELS,
    RESOLVED_MODEL,
    RESOLVED_TOKENIZER,
    TOKENIZER_DIR,
    read_config_json,
    read_tokenizer,
)


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
                       f"{incomplete_note(self.checkpoint_dir)}; train first"
                       " (fusedlm train writes one every checkpoint.every steps).")
    if step is None:
      return self.steps[-1]
    if step not in self.steps:
      raise ValueError(f"no checkpoint at step {step} in {self.checkpoint_dir}; the"
                       f" complete checkpoints are at steps {list(self.steps)}"
                       f"{incomplete_note(self.checkpoint_dir)}.")
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
      raise type(e)(f"{e}. Other checkpoints in {self.checkpoint_dir}: steps"
                       f" {others or 'none'}.") from e


def open_run(workdir: str | os.PathLike) -> SavedRun:
  """Reads a workdir's config.json, tokenizer and checkpoint list (no arrays).

  Raises:
    FileNotFoundError: no such folder, or one without config.json / tokenizer/.
    ValueError: a config.json without the resolved model (not written by
      fusedlm train or fusedlm finetune).
  """
  workdir = Path(workdir).absolute()
  if not workdir.is_dir():
    raise FileNotFoundError(f"no run folder at {workdir}")
  config_path = workdir / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(
        f"{workdir} has no {CONFIG_FILE}: not a fusedlm workdir (fusedlm train"
        f" writes {CONFIG_FILE}, {TOKENIZER_DIR}/ and"
        f" {CHECKPOINT_DIR}/ there).")
  record = read_config_json(config_path)
  model_dict = record.pop(RESOLVED_MODEL, None)
  if model_dict is None:
    raise ValueError(f"{config_path} lacks {RESOLVED_MODEL!r}, the model the checkpoints"
                     " were written for; was it written by fusedlm train?")
  labels = record.pop(RESOLVED_LABELS, None)
  record.pop(RESOLVED_TOKENIZER, None)
  return SavedRun(
      workdir=workdir,
      config=ml_collections.ConfigDict(record),
      model_cfg=ModelConfig.from_dict(model_dict),
      tokenizer=read_tokenizer(workdir),
      label_names=tuple(labels) if labels is not None else None,
      steps=checkpoint_steps(workdir / CHECKPOINT_DIR),
  )

