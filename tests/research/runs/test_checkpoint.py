"""Checkpoints: save/restore round trip, keep-N, tmp dirs never loaded, shapes
checked; reopening a workdir: parameters only, the steps that exist, clear errors."""

import json
import shutil

import jax
import numpy as np
import pytest

from fusedlm.research.runs import checkpoint as ckpt_lib
from fusedlm.research.runs import run_files, saved_run
from fusedlm.research.training import optimizer, steps


def _state(width=4, value=1.0):
  return {"params": {"w": np.full((width, 3), value, np.float32)},
          "step": np.asarray(7, np.int32), "rng": np.asarray([1, 2], np.uint32)}


def test_round_trip_and_keep(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=2, use_async=True)
  for step in (1, 2, 3):
    ckpt.save(step, _state(value=float(step)))
  ckpt.wait()
  assert ckpt.manager.all_steps() == [2, 3]
  restored = ckpt.restore(3, _state())
  np.testing.assert_array_equal(restored["params"]["w"], 3.0)
  assert restored["rng"].dtype == np.uint32
  ckpt.close()


def test_interrupted_save_is_ignored(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, use_async=False)
  ckpt.save(1, _state())
  ckpt.close()
  # What a save killed before Orbax's final rename leaves behind:
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-123").mkdir()
  again = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, use_async=False)
  assert again.latest_step() == 1
  again.close()


def test_shape_mismatch_is_a_value_error(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, use_async=False)
  ckpt.save(1, _state(width=4))
  with pytest.raises(ValueError, match="does not fit"):
    ckpt.restore(1, _state(width=8))
  ckpt.close()


def test_config_mismatch_names_fields(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"resolved_model": {"hidden_size": 64, "num_layers": 2}}))
  run_files.check_resumable(tmp_path, {}, {"hidden_size": 64, "num_layers": 2})
  with pytest.raises(ValueError, match=r"num_layers: 2 -> 3"):
    run_files.check_resumable(tmp_path, {}, {"hidden_size": 64, "num_layers": 3})


def test_restores_the_trained_parameters_only(trained_gpt):
  run = saved_run.open_run(trained_gpt)
  assert run.steps == (20, 40) and run.objective == "causal"
  assert run.model_cfg.kind == "decoder" and run.tokenizer.kind == "byte"
  step, params = run.restore_params()
  assert step == 40
  # The full TrainState, restored the way training resumes, holds the same params.
  config = run.config
  tx = optimizer.build_optimizer(config.optimizer, config.train.steps)
  full = ckpt_lib.Checkpointer(trained_gpt, 20, 3).restore(
      40, steps.abstract(run.model_cfg, tx, config.train.seed))
  flat = jax.tree_util.tree_leaves_with_path(params)
  assert len(flat) == len(jax.tree_util.tree_leaves(full.params))
  for (path, leaf), other in zip(flat, jax.tree_util.tree_leaves(full.params)):
    assert isinstance(leaf, np.ndarray), path
    np.testing.assert_array_equal(leaf, other)


def test_an_unknown_step_lists_the_existing_ones(trained_gpt):
  run = saved_run.open_run(trained_gpt)
  with pytest.raises(ValueError, match=r"no checkpoint at step 7 .*steps \[20, 40\]"):
    run.restore_params(7)


@pytest.fixture
def copied_run(trained_gpt, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(trained_gpt, target)
  return target


def test_an_incomplete_checkpoint_is_named(copied_run):
  shutil.rmtree(copied_run / "checkpoints" / "40" / "state")
  (copied_run / "checkpoints" / "60.orbax-checkpoint-tmp-1").mkdir()
  run = saved_run.open_run(copied_run)
  with pytest.raises(ValueError, match=r"checkpoints/40 is damaged or incomplete(.|\n)*"
                                       r"Other checkpoints in .*: steps \[20\]"):
    run.restore_params(40)
  assert run.restore_params(20)[0] == 20  # the older one is intact
  with pytest.raises(ValueError, match=r"unfinished saves, ignored: \['60.orbax"):
    run.restore_params(60)


def test_no_checkpoint_at_all(copied_run):
  shutil.rmtree(copied_run / "checkpoints")
  with pytest.raises(ValueError, match="holds no complete checkpoint"):
    saved_run.open_run(copied_run).restore_params()


def test_a_checkpoint_that_does_not_fit_the_recorded_model(copied_run):
  path = copied_run / "config.json"
  record = json.loads(path.read_text())
  record["resolved_model"]["mlp_dim"] = 128
  path.write_text(json.dumps(record))
  with pytest.raises(ValueError, match=r"mlp.*saved \(64, 256\), config \(64, 128\)"):
    saved_run.open_run(copied_run).restore_params()


def test_folders_that_are_not_runs(tmp_path, copied_run):
  with pytest.raises(FileNotFoundError, match="no run folder"):
    saved_run.open_run(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    saved_run.open_run(tmp_path)
  shutil.rmtree(copied_run / "tokenizer")
  with pytest.raises(FileNotFoundError, match="no tokenizer/ folder"):
    saved_run.open_run(copied_run)


def test_a_model_field_added_since_the_save_holds_its_default(tmp_path):
  from fusedlm.research.models.config import ModelConfig
  current = ModelConfig().to_dict()
  older = {k: v for k, v in current.items() if k != "sliding_window"}  # saved before it existed
  (tmp_path / "config.json").write_text(json.dumps({"resolved_model": older}))
  run_files.check_resumable(tmp_path, {}, current)
  changed = dict(current, num_layers=current["num_layers"] + 1)
  with pytest.raises(ValueError, match="num_layers"):
    run_files.check_resumable(tmp_path, {}, changed)
