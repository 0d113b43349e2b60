"""Starting a run from a pretrained one: its tokenizer, model config and parameters.

  start = load_warm_start("runs/tiny_bert")          # newest checkpoint
  params, report = transfer_params(start.params, fresh_params)

Fine-tuning builds a new model (the pretrained architecture with a
classification or span head, without the pretraining heads) and fills every parameter
it shares with the pretrained one by name; the rest keep their fresh
initialisation and are reported, as Hugging Face reports "newly initialized"
and "unused" weights.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fusedlm.research.data import Tokenizer
from fusedlm.research.models.config import ModelConfig
from fusedlm.research.runs import saved_run

# Task heads are always trained afresh, even when the pretrained run had one
# (a classifier fine-tuned again on other labels).
FRESH_PREFIXES = ("['classifier']", "['span_head']")


@dataclasses.dataclass(frozen=True)
class WarmStart:
  """A pretrained run's checkpoint, ready to initialise another run."""

  workdir: Path
  step: int
  tokenizer: Tokenizer
  model_cfg: ModelConfig
  params: Any  # host numpy parameter tree

  @property
  def source(self) -> str:
    return f"{self.workdir} step {self.step}"


def load_warm_start(workdir: str | os.PathLike, step: int | None = None) -> WarmStart:
  """The pretrained run at `step` (None: newest); errors as saved_run.open_run's."""
  run = saved_run.open_run(workdir)
  step, params = run.restore_params(step)
  return WarmStart(run.workdir, step, run.tokenizer, run.model_cfg, params)


@dataclasses.dataclass(frozen=True)
class TransferReport:
  kept: int  # leaves taken from the pretrained model
  fresh: tuple[str, ...]  # leaves of the new model left at their initialisation
  unused: tuple[str, ...]  # pretrained leaves the new model has no place for

  def describe(self) -> str:
    return (f"{self.kept} pretrained parameter arrays loaded; newly initialised:"
            f" {list(self.fresh) or 'none'}; unused pretrained: {list(self.unused) or 'none'}")


def transfer_params(pretrained, fresh) -> tuple[Any, TransferReport]:
  """`fresh`'s tree with every leaf it shares (same path) with `pretrained`.

  Raises:
    ValueError: a shared leaf whose shape differs (the architectures differ).
  """
  old = {jax.tree_util.keystr(path): leaf
         for path, leaf in jax.tree_util.tree_leaves_with_path(pretrained)}
  kept, new, bad = 0, [], []

  def take(path, leaf):
    nonlocal kept
    name = jax.tree_util.keystr(path)
    source = old.get(name)
    if source is None or name.startswith(FRESH_PREFIXES):
      new.append(name)
      return leaf
    if tuple(np.shape(source)) != tuple(leaf.shape):
      bad.append(f"{name}: pretrained {np.shape(source)}, new {tuple(leaf.shape)}")
      return leaf
    kept += 1
    return np.asarray(source, dtype=leaf.dtype)

  params = jax.tree_util.tree_map_with_path(take, fresh)
  if bad:
    raise ValueError("the pretrained parameters do not fit the new model: "
                     + "; ".join(bad[:10]))
  names = {jax.tree_util.keystr(path)
           for path, _ in jax.tree_util.tree_leaves_with_path(fresh)}
  unused = tuple(sorted(name for name in old if name not in names))
  return params, TransferReport(kept, tuple(new), unused)
