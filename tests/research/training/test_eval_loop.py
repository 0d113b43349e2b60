"""Checkpoint evaluation: reproducible, device-count independent, trained beats
untrained, other data, and clear errors (library and command line)."""

import json
import math

import jax
import pytest

from fusedlm.research import models, objectives
from fusedlm.research.runs import saved_run
from fusedlm.research.runs.parallel import replicate
from fusedlm.research.training import eval_loop, steps
from fusedlm.research.training.eval_loop import evaluate_batches
from tests.commands import fusedlm


def test_evaluating_twice_gives_identical_numbers(trained_gpt, trained_bert):
  for workdir in (trained_gpt, trained_bert):
    first = eval_loop.evaluate_run(workdir, max_batches=4)
    second = eval_loop.evaluate_run(workdir, max_batches=4)
    assert first["metrics"] == second["metrics"]


def test_trained_beats_untrained_by_a_clear_margin(trained_gpt):
  trained = eval_loop.evaluate_run(trained_gpt, max_batches=8)["metrics"]
  run = saved_run.open_run(trained_gpt)
  devices = jax.local_devices()[:1]
  causal = objectives.get("causal")
  batches, _ = causal.eval_data(run.config, run.tokenizer, 16)
  p_eval = steps.pmapped_eval_step(models.build_model(run.model_cfg), causal, devices)
  fresh = models.init_params(run.model_cfg, jax.random.PRNGKey(0))
  untrained = evaluate_batches(p_eval, replicate(fresh, devices),
                               batches.eval_batches(8), 1)
  # Untrained: ~ln(261) = 5.56 nats/char; 40 steps reach ~2.7 on this corpus.
  assert untrained["loss"] > 5.0
  assert trained["loss"] < untrained["loss"] - 2.0
  assert trained["perplexity"] == pytest.approx(math.exp(trained["loss"]))


def test_trained_on_eight_devices_evaluated_on_one(trained_gpt, trained_bert):
  assert jax.local_device_count() == 8  # the fixtures trained on all 8
  for workdir in (trained_gpt, trained_bert):
    one = eval_loop.evaluate_run(workdir, num_devices=1, max_batches=4)["metrics"]
    eight = eval_loop.evaluate_run(workdir, num_devices=8, max_batches=4)["metrics"]
    assert one["tokens"] == eight["tokens"]
    for key in one:
      assert one[key] == pytest.approx(eight[key], rel=1e-5), key


def test_mlm_reports_masked_lm_and_nsp_metrics(trained_bert):
  result = eval_loop.evaluate_run(trained_bert, step=20, max_batches=4)
  assert result["step"] == 20 and result["objective"] == "mlm"
  m = result["metrics"]
  assert {"loss", "accuracy", "perplexity", "nsp_loss", "nsp_accuracy"} <= set(m)
  assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
  assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["nsp_accuracy"] <= 1.0


def test_other_data_is_evaluated_whole(trained_gpt, tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
  result = eval_loop.evaluate_run(trained_gpt, data=str(text))
  assert result["data"] == f"{text} (all 1 documents)"
  # 1,800 characters, one token each, in windows of 64 (+1 target): all scored.
  assert 1700 < result["metrics"]["tokens"] <= 1800
  assert result["metrics"]["batches"] == 2


def test_bad_inputs_are_named(trained_gpt, tmp_path):
  with pytest.raises(ValueError, match=r"no checkpoint at step 5 .*\[20, 40\]"):
    eval_loop.evaluate_run(trained_gpt, step=5)
  with pytest.raises(ValueError, match="batch size \\(12\\) must be a positive multiple"
                                       " of the 8 devices"):
    eval_loop.evaluate_run(trained_gpt, batch_size=12)
  with pytest.raises(ValueError, match="num_devices=9, but this machine has 8"):
    eval_loop.evaluate_run(trained_gpt, num_devices=9)
  with pytest.raises(FileNotFoundError):
    eval_loop.evaluate_run(trained_gpt, data=str(tmp_path / "none.txt"))
  with pytest.raises(FileNotFoundError, match="no run folder"):
    eval_loop.evaluate_run(tmp_path / "none")


def _cli(*args):
  return fusedlm("evaluate", *args)


def test_command_line_writes_json_and_refuses_a_missing_step(trained_gpt):
  done = _cli("--workdir", str(trained_gpt), "--max_batches", "2")
  assert done.returncode == 0, done.stderr
  written = json.loads((trained_gpt / "eval" / "step_40.json").read_text())
  assert written["step"] == 40 and written["metrics"]["batches"] == 2
  assert "perplexity" in done.stdout
  # The smoke config asks for "xla"; each of its 2 layers is named.
  attention = ("  self-attention x2 (q_len 64, kv_len 64): xla (requested)"
               " [transformer/layer_0/attention .. transformer/layer_1/attention]")
  assert written["attention"][1:] == [attention]
  assert attention in done.stdout.splitlines()
  bad = _cli("--workdir", str(trained_gpt), "--step", "3")
  assert bad.returncode == 2
  assert "no checkpoint at step 3" in bad.stderr and "Traceback" not in bad.stderr
