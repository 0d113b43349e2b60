"""Checkpoints: Orbax CheckpointManager plus config.json and the tokenizer.

Workdir layout (self-contained):
  DIR/config.json          the run config (JSON); its model section guards resumes
  DIR/tokenizer/           Tokenizer.save: the exact tokenizer of the run
  DIR/checkpoints/<step>/  Orbax checkpoints of the TrainState (step, params,
                           optimizer state, dropout RNG); the data position is
                           the step, since batch(step) is a pure function

Orbax writes each step to "<step>.orbax-checkpoint-tmp-*" and renames it when
complete, and `latest_step()` skips such temporaries, so an interrupted save is
never the one restored.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from research import run_config

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
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state)),
        force=force)

  def restore(self, step: int, abstract_state):
    """The state saved at `step`, on the host; ValueError if its tree differs."""
    target = jax.tree_util.tree_map(
        lambda x: np.zeros(x.shape, x.dtype), abstract_state)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # Orbax raises several types for a tree mismatch.
      raise ValueError(
          f"checkpoint {self.workdir / CHECKPOINT_DIR / str(step)} does not fit the"
          f" current config's state tree: {e}") from e
    state = restored["state"]
    check_shapes(state, abstract_state)
    return state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


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
