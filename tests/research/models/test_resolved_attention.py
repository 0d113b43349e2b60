"""What each attention layer resolves to: traced abstractly, per call, with the reason.

The device is a stand-in H100 (kernels.target_device, tests/kernels/stand_ins.py),
so the Hopper rule is checked on any machine and either JAX; nothing is
compiled or run.
"""

import jax
import numpy as np
import pytest

from fusedlm import kernels
from fusedlm.research import objectives
from fusedlm.research.models import config as model_config
from fusedlm.research.models import resolved_attention
from tests.kernels.stand_ins import H100, mosaic_jax  # noqa: F401

pytestmark = pytest.mark.usefixtures("mosaic_jax")
DECODING = "Hopper GPU, a call the kernel takes; q_len 1 <= 16: its XLA decoding path"


def _causal_batch(rows=2, seq=64):
  ids = np.zeros((rows, seq), np.int32)
  return {"inputs": ids, "targets": ids, "segment_ids": np.ones_like(ids),
          "positions": np.zeros_like(ids)}


def _one_line(calls):
  """(kind, q_len, kv_len, implementation, reason) of each call."""
  return [(c.kind, c.q_len, c.kv_len, c.resolution.implementation, c.resolution.reason)
          for c in calls]


def test_packed_gpt_resolves_to_mosaic_in_training_and_evaluation():
  cfg = model_config.tiny_gpt(dtype="bfloat16")
  with kernels.target_device(H100):
    for training in (False, True):
      calls = resolved_attention.for_batch(cfg, objectives.get("causal"),
                                           _causal_batch(), training=training)
      assert [c.path for c in calls] == [
          f"transformer/layer_{i}/attention" for i in range(cfg.num_layers)]
      assert set(_one_line(calls)) == {
          ("self-attention", 64, 64, "mosaic", "Hopper GPU, a call the kernel takes")}


def test_attention_dropout_stays_on_mosaic_in_training():
  # Issue 25 put dropout on the Hopper kernel: training and evaluation alike.
  cfg = model_config.tiny_bert(attention_dropout=0.1, dtype="bfloat16")
  batch = {"input_ids": np.zeros((2, 32), np.int32),
           "token_type_ids": np.zeros((2, 32), np.int32),
           "padding_mask": np.ones((2, 32), bool)}
  with kernels.target_device(H100):
    train = resolved_attention.for_batch(cfg, objectives.get("mlm"), batch, training=True)
    evaluation = resolved_attention.for_batch(cfg, objectives.get("mlm"), batch)
  assert {c.resolution.implementation for c in train + evaluation} == {"mosaic"}


def test_a_relative_bias_past_head_dim_128_falls_back_naming_why():
  cfg = model_config.tiny_gpt(position="relative", dtype="bfloat16", hidden_size=512,
                              num_heads=2, num_layers=1)
  with kernels.target_device(H100):
    calls = resolved_attention.for_batch(cfg, objectives.get("causal"), _causal_batch())
  assert {c.resolution for c in calls} == {kernels.Resolution(
      "pallas", "mosaic takes a bias at head dims up to 128, not 256 (shared memory)")}


def test_float32_compute_falls_back_naming_the_dtype():
  cfg = model_config.tiny_gpt(dtype="float32")
  with kernels.target_device(H100):
    calls = resolved_attention.for_batch(cfg, objectives.get("causal"), _causal_batch())
  assert {c.resolution.implementation for c in calls} == {"pallas"}
  assert "bfloat16 or float16" in calls[0].resolution.reason


def test_generation_names_prefill_and_the_cached_decoding_step():
  cfg = model_config.tiny_gpt(num_layers=2)
  with kernels.target_device(H100):
    calls = resolved_attention.for_generation(cfg, batch=3, prompt_len=40, cache_len=72)
    lines = resolved_attention.describe(calls, cfg)
  assert _one_line(calls) == (
      [("self-attention", 40, 40, "mosaic", "Hopper GPU, a call the kernel takes")] * 2
      + [("self-attention", 1, 72, "mosaic", DECODING)] * 2)
  assert lines == [
      "attention 'auto' on gpu device NVIDIA H100 80GB HBM3 (compute capability 9.0):",
      "  self-attention x2 (q_len 40, kv_len 40): mosaic (Hopper GPU, a call the kernel"
      " takes) [transformer/layer_0/attention .. transformer/layer_1/attention]",
      f"  self-attention x2 (q_len 1, kv_len 72): mosaic ({DECODING})"
      " [transformer/layer_0/attention .. transformer/layer_1/attention]"]


def test_seq2seq_names_encoder_decoder_and_cross_attention():
  cfg = model_config.tiny_seq2seq()
  with kernels.target_device(H100):
    calls = resolved_attention.for_generation(cfg, batch=2, prompt_len=30, cache_len=20)
  stacks = {(c.path.split("/")[0], c.kind, c.q_len, c.kv_len) for c in calls}
  assert stacks == {("encoder", "self-attention", 30, 30),
                    ("decoder", "self-attention", 1, 1),  # the start token
                    ("decoder", "cross-attention", 1, 30),
                    ("decoder", "self-attention", 1, 20)}


def test_on_this_machine_and_as_requested():
  cfg = model_config.tiny_gpt(num_layers=1, attention="pallas")
  calls = resolved_attention.for_batch(cfg, objectives.get("causal"), _causal_batch())
  assert _one_line(calls) == [("self-attention", 64, 64, "pallas", "requested")]
  auto = resolved_attention.for_batch(cfg.replace(attention="auto"),
                                      objectives.get("causal"), _causal_batch())
  expected = kernels.explain_implementation(
      "auto", jax.ShapeDtypeStruct((2, 64, 4, 32), "bfloat16"),
      *[jax.ShapeDtypeStruct((2, 64, 4, 32), "bfloat16")] * 2)
  assert auto[0].resolution == expected


def test_an_encoder_does_not_generate():
  with pytest.raises(ValueError, match="kind 'encoder' does not generate"):
    resolved_attention.for_generation(model_config.tiny_bert(), batch=1, prompt_len=4,
                                      cache_len=8)
