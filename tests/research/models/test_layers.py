"""Shared layers: norm placement, remat, dropout, dtypes, the tied output layer."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.research.models import build_model, init_params, random_params
from fusedlm.research.models import config as model_config
from fusedlm.research.models.attention import AttentionMask
from fusedlm.research.models.layers import Embedding, Transformer, TransformerBlock


def _config(**changes):
  return model_config.tiny_gpt(
      vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
      max_len=32, dtype="float32", attention="xla").replace(**changes)


def _block_io(cfg, seed=0):
  x = jax.random.normal(jax.random.key(seed), (2, 6, cfg.hidden_size))
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  return x, positions, AttentionMask(causal=True)


def _block_params(cfg):
  return {"params": random_params(cfg)["transformer"]["layer_0"]}


def test_post_ln_block_output_is_normalised_per_position():
  cfg = _config(norm="post")
  x, positions, mask = _block_io(cfg)
  params = _block_params(cfg)
  params["params"]["mlp_norm"] = {"scale": jnp.ones(32), "bias": jnp.zeros(32)}
  y, _ = TransformerBlock(cfg).apply(params, 3.0 * x + 1.0, positions, mask, True)
  # The block ends in LN(x + f(x)); with scale 1 and bias 0 that is standardised.
  np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.std(-1), 1.0, rtol=1e-3)


def test_pre_ln_block_keeps_the_residual_stream():
  """x + f(LN(x)): a constant added to x passes straight through (LN removes it)."""
  cfg = _config(norm="pre")
  x, positions, mask = _block_io(cfg)
  block = TransformerBlock(cfg)
  params = _block_params(cfg)
  y, _ = block.apply(params, x, positions, mask, True)
  y_shifted, _ = block.apply(params, x + 5.0, positions, mask, True)
  np.testing.assert_allclose(y_shifted - y, 5.0, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind, norm", [("decoder", "pre"), ("decoder", "post"),
                                        ("encoder", "pre"), ("encoder", "post")])
def test_norm_placement_decides_embedding_and_final_norms(kind, norm):
  cfg = _config(kind=kind, norm=norm)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  assert ("norm" in params["embeddings"]) == (norm == "post")
  assert ("final_norm" in params["transformer"]) == (norm == "pre")


def test_remat_changes_neither_values_nor_gradients():
  cfg = _config(position="rotary")
  x, positions, mask = _block_io(cfg)
  plain, remat = Transformer(cfg), Transformer(cfg.replace(remat=True))
  params = {"params": random_params(cfg)["transformer"]}

  @functools.partial(jax.jit, static_argnums=1)
  def loss_and_grad(p, model):
    return jax.value_and_grad(
        lambda p: jnp.sum(model.apply(p, x, positions, mask)[0] ** 2))(p)

  chex.assert_trees_all_close(loss_and_grad(params, remat),
                              loss_and_grad(params, plain), rtol=1e-5, atol=1e-6)


def test_dropout_is_active_only_when_not_deterministic():
  cfg = _config(dropout=0.5)
  model = build_model(cfg)
  params = random_params(cfg)
  ids = jnp.arange(12).reshape(2, 6)
  apply = jax.jit(model.apply, static_argnames="deterministic")
  eval_logits = apply({"params": params}, ids)
  no_dropout = jax.jit(build_model(cfg.replace(dropout=0.0)).apply)(
      {"params": params}, ids)
  np.testing.assert_array_equal(eval_logits, no_dropout)
  train = [apply({"params": params}, ids, deterministic=False,
                 rngs={"dropout": jax.random.key(seed)}) for seed in (1, 2)]
  assert np.abs(np.asarray(train[0] - eval_logits)).max() > 1e-3
  assert np.abs(np.asarray(train[0] - train[1])).max() > 1e-3


def test_tied_output_layer_is_float32_in_bfloat16_compute():
  cfg = _config(dtype="bfloat16")
  table = Embedding(50, 32, cfg)
  ids = jnp.array([[3, 7]])
  params = table.init(jax.random.key(0), ids)
  x = table.apply(params, ids)
  assert x.dtype == jnp.bfloat16
  logits = table.apply(params, x, method="attend")
  assert logits.dtype == jnp.float32
  reference = np.asarray(x, np.float32) @ np.asarray(
      params["params"]["embedding"], np.float32).astype(jnp.bfloat16).astype(
          np.float32).T
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits_close():
  cfg32 = _config()
  cfg16 = cfg32.replace(dtype="bfloat16")
  params = init_params(cfg16, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  ids = jnp.arange(16).reshape(2, 8)
  logits16 = jax.jit(build_model(cfg16).apply)({"params": params}, ids)
  logits32 = jax.jit(build_model(cfg32).apply)({"params": params}, ids)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits32, atol=0.05)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_init_std_sets_the_scale_of_every_initial_weight(norm):
  # Every table and kernel is drawn from N(0, init_std^2), the pre-LN residual
  # projections from N(0, init_std^2 / (2 num_layers)) (GPT-2); biases start at 0.
  cfg = model_config.tiny_bert(
      vocab_size=500, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=256,
      max_len=32, dtype="float32", attention="xla", norm=norm, init_std=0.1,
      position="relative")
  params = init_params(cfg, jax.random.key(0))
  residual = 0.1 / np.sqrt(2 * cfg.num_layers) if norm == "pre" else 0.1
  layer = params["transformer"]["layer_0"]
  expected = {
      "token table": (params["embeddings"]["token"]["embedding"], 0.1),
      "token types": (params["embeddings"]["token_type"]["embedding"], 0.1),
      "query": (layer["attention"]["query"]["kernel"], 0.1),
      "relative bias": (layer["attention"]["relative_bias"]["embedding"], 0.1),
      "mlp up": (layer["mlp"]["up"]["kernel"], 0.1),
      "attention out": (layer["attention"]["out"]["kernel"], residual),
      "mlp down": (layer["mlp"]["down"]["kernel"], residual),
      "pooler": (params["pooler"]["dense"]["kernel"], 0.1),
  }
  for name, (value, std) in expected.items():
    np.testing.assert_allclose(np.std(value), std, rtol=0.2, err_msg=name)
  assert not np.any(layer["mlp"]["up"]["bias"])
