"""build_model, parameter counts, and each objective's outputs feeding its loss."""

import jax
import numpy as np
import pytest

from fusedlm.research import objectives
from fusedlm.research.models import (
  build_model,
  count_params,
  init_params,
  random_params,
)
from fusedlm.research.models import config as model_config
from fusedlm.research.models.decoder import Decoder
from fusedlm.research.models.encoder import Encoder


def test_gpt2_small_has_124_4m_parameters():
  # Tied LM head counted once; biases, LayerNorms and the 1024-row position
  # table included: the 124,439,808 of Hugging Face's GPT2LMHeadModel.
  assert count_params(model_config.gpt2_small()) == 124_439_808


def test_bert_base_has_110m_parameters():
  # With MLM and NSP heads, MLM decoder tied to the word embedding (counted
  # once): Hugging Face's BertForPreTraining, 110,106,428.
  assert count_params(model_config.bert_base()) == 110_106_428
  # The bare trunk (no pooler, no heads): BertModel's 109,482,240 less its pooler.
  bare = model_config.bert_base(mlm=False, nsp=False)
  assert count_params(bare) == 109_482_240 - (768 * 768 + 768)


@pytest.mark.parametrize("name", ["tiny_gpt", "tiny_bert"])
def test_tiny_presets_have_one_to_two_million_parameters(name):
  assert 1_000_000 <= count_params(model_config.presets[name]()) <= 2_000_000


def test_grouped_query_heads_shrink_the_key_value_projections():
  mha = count_params(model_config.tiny_gpt())
  gqa = count_params(model_config.tiny_gpt(num_kv_heads=1))
  # Per layer, key and value lose 3 of 4 heads: 2 * (128 * 96 + 96) parameters.
  assert mha - gqa == 4 * 2 * (128 * 96 + 96)


def test_build_model_follows_the_kind():
  assert isinstance(build_model(model_config.tiny_gpt()), Decoder)
  assert isinstance(build_model(model_config.tiny_bert()), Encoder)


def _small(preset, **changes):
  return model_config.presets[preset](
      vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
      max_len=16, dtype="float32", attention="xla").replace(**changes)


def _batches():
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 40, (2, 8)).astype(np.int32)
  padding_mask = np.arange(8)[None] < np.array([[8], [6]])
  causal = {
      "inputs": ids, "targets": np.roll(ids, -1, axis=1),
      "segment_ids": np.ones_like(ids), "positions": np.tile(np.arange(8), (2, 1)),
      "loss_mask": np.ones(ids.shape, np.float32),
  }
  mlm = {
      "input_ids": ids, "token_type_ids": np.zeros_like(ids),
      "padding_mask": padding_mask, "mlm_labels": rng.randint(0, 40, ids.shape),
      "mlm_weights": (rng.rand(2, 8) < 0.3).astype(np.float32) * padding_mask,
      "nsp_labels": np.array([0, 1]),
  }
  classification = {
      "input_ids": ids, "token_type_ids": np.zeros_like(ids),
      "padding_mask": padding_mask, "labels": np.array([1, 2]),
  }
  return {"causal": causal, "mlm": mlm, "classification": classification}


@pytest.mark.parametrize("preset, objective, changes", [
    ("tiny_gpt", "causal", {}),
    ("tiny_bert", "mlm", {}),
    ("tiny_bert", "classification", {"num_labels": 3}),
    ("tiny_gpt", "classification", {"num_labels": 3}),
])
def test_a_gradient_step_on_the_objective_lowers_its_loss(preset, objective, changes):
  cfg = _small(preset, dropout=0.1, **changes)
  model = build_model(cfg)
  batch = _batches()[objective]
  record = objectives.get(objective)

  @jax.jit
  def loss_and_grad(params, dropout_rng):
    def loss(params):
      outputs = record.outputs(model, {"params": params}, batch,
                               deterministic=False, rngs={"dropout": dropout_rng})
      return record.loss(outputs, batch, cfg)
    return jax.value_and_grad(loss, has_aux=True)(params)

  # The trainer's init for one case; host-drawn values (no init compile) for the rest.
  if objective == "causal":
    params = init_params(cfg, jax.random.key(0))
  else:
    params = random_params(cfg)
  # One dropout key throughout, so before and after see the same function.
  (before, metrics), grads = loss_and_grad(params, jax.random.key(1))
  assert np.isfinite(before) and metrics["count"] > 0
  stepped = jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads)
  (after, _), _ = loss_and_grad(stepped, jax.random.key(1))
  assert after < before, (before, after)


def test_unknown_objective_is_refused():
  cfg = _small("tiny_gpt")
  with pytest.raises(ValueError, match="unknown objective 'rl'"):
    objectives.get("rl").outputs(build_model(cfg), {"params": {}}, {})
