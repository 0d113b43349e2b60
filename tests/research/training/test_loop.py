"""End-to-end training: loss falls, exact resume, 1 vs 8 devices, NaN stop,
mismatched checkpoints, the MLM and Pallas paths. Tiny model on the synthetic
corpus with the byte tokenizer (nothing to train, quick to tokenize)."""

import math

import jax
import numpy as np
import pytest

from fusedlm.research.runs import checkpoint as ckpt_lib
from fusedlm.research.runs import logger as run_logging
from fusedlm.research.training import loop
from tests.research.conftest import tiny_gpt_config


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("fusedlm_cache"))


def tiny_config(cache_dir, steps=6, **train_overrides):
  """conftest's tiny GPT at batch 8; logs every step, checkpoints every 2."""
  config = tiny_gpt_config(cache_dir, steps)
  config.train.update(batch_size=8, log_every=1, eval_batches=2)
  config.train.update(train_overrides)
  config.optimizer.warmup_steps = 2
  config.checkpoint.update(every=2, keep=5)
  return config


def losses(workdir):
  return {s: r["loss"] for s, r in run_logging.read_metrics(workdir).items()}


def test_resume_is_exact(cache_dir, tmp_path):
  config = tiny_config(cache_dir, steps=6)
  config.model.dropout = 0.1  # the dropout RNG must resume too
  loop.train(config, tmp_path / "full", progress=False)
  loop.train(config, tmp_path / "cut", progress=False, stop_at=3)
  assert ckpt_lib.Checkpointer(tmp_path / "cut", 2, 5).latest_step() == 3
  out = loop.train(config, tmp_path / "cut", progress=False)
  assert out["start_step"] == 3
  full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
  assert sorted(full) == list(range(1, 7))
  for step in range(4, 7):
    assert cut[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), step


def test_one_and_eight_devices_agree(cache_dir, tmp_path):
  assert jax.local_device_count() == 8, "tests/conftest.py asks XLA for 8 CPU devices"
  config = tiny_config(cache_dir, steps=3)
  one = loop.train(config, tmp_path / "one", num_devices=1, progress=False)
  eight = loop.train(config, tmp_path / "eight", num_devices=8, progress=False)
  l1, l8 = losses(tmp_path / "one"), losses(tmp_path / "eight")
  for step in (1, 2, 3):
    assert l8[step] == pytest.approx(l1[step], rel=1e-4), step
  assert eight["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-4)


def test_mismatched_checkpoint_is_refused(cache_dir, tmp_path):
  config = tiny_config(cache_dir, steps=2)
  loop.train(config, tmp_path, progress=False)
  config.model.hidden_size = 96
  config.model.num_heads = 3
  config.train.steps = 4
  with pytest.raises(ValueError, match="hidden_size: 64 -> 96"):
    loop.train(config, tmp_path, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cache_dir, tmp_path):
  config = tiny_config(cache_dir, steps=2)
  loop.train(config, tmp_path, progress=False)
  config.train.steps = 40
  config.optimizer.learning_rate = 1e6  # decay factor 1 - lr*wd explodes the weights
  config.optimizer.weight_decay = 1.0
  with pytest.raises(FloatingPointError, match=r"non-finite training metrics at step \d+"):
    loop.train(config, tmp_path, progress=False)
  ckpt = ckpt_lib.Checkpointer(tmp_path, 2, 5)
  last = ckpt.latest_step()
  rows = losses(tmp_path)
  assert last is not None and all(math.isfinite(rows[s]) for s in rows if s <= last)
  step_dir = tmp_path / "checkpoints" / str(last)
  assert step_dir.exists()
  ckpt.close()


@pytest.mark.slow
def test_loss_falls(cache_dir, tmp_path):
  config = tiny_config(cache_dir, steps=40)
  config.train.log_every = 10
  out = loop.train(config, tmp_path, progress=False)
  rows = losses(tmp_path)
  assert rows[40] < rows[10] - 0.3, rows
  assert out["eval"]["loss"] < math.log(256)
  assert (tmp_path / "config.json").exists()
  assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
  assert list((tmp_path / "tensorboard").iterdir())


def test_mlm_with_nsp_runs(cache_dir, tmp_path):
  config = tiny_config(cache_dir, steps=3)
  config.model.preset = "tiny_bert"
  config.model.norm = "post"
  config.objective = "mlm"
  config.nsp = True
  config.data.update({"mask_prob": 0.15, "whole_word_masking": False})
  out = loop.train(config, tmp_path, num_devices=2, progress=False)
  assert np.isfinite(out["eval"]["loss"]) and "nsp_loss" in out["eval"]


def test_pallas_attention_path(cache_dir, tmp_path):
  config = tiny_config(cache_dir, steps=2)
  config.model.attention = "pallas"  # Pallas interpreter on CPU
  config.train.eval_batches = 1
  out = loop.train(config, tmp_path, num_devices=1, progress=False)
  assert np.isfinite(out["eval"]["loss"])


def test_gradient_accumulation_counts_micro_batches(cache_dir, tmp_path):
  config = tiny_config(cache_dir, steps=2)  # 2 updates of 2 micro-batches each
  config.optimizer.accumulation_steps = 2
  config.optimizer.warmup_steps = 1
  out = loop.train(config, tmp_path, num_devices=1, progress=False)
  assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
  assert np.isfinite(out["eval"]["loss"])


def test_norms_are_logged_and_a_profile_is_written(cache_dir, tmp_path):
  config = tiny_config(cache_dir, steps=5)
  config.train.profile_steps = 2
  loop.train(config, tmp_path, progress=False)
  rows = run_logging.read_metrics(tmp_path)
  for step in range(2, 6):
    for key in ("grad_norm", "param_norm", "update_norm"):
      assert math.isfinite(rows[step][key]) and rows[step][key] > 0, (step, key)
  assert rows[1]["update_norm"] == 0.0  # the warm-up's first rate is 0
  # The update is the step's change of the parameters.
  assert rows[3]["update_norm"] < rows[3]["param_norm"]
  traces = list((tmp_path / "profile" / "process_0").rglob("*.xplane.pb"))
  assert traces, sorted((tmp_path / "profile").rglob("*"))
