"""Self-attention layer: rotary embedding, grouped-query heads, the KV cache."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.research.models import random_params
from fusedlm.research.models.attention import (
  AttentionMask,
  LayerCache,
  SelfAttention,
  apply_rotary,
)
from fusedlm.research.models.config import ModelConfig


def _config(**changes):
  base = dict(hidden_size=32, num_heads=4, num_layers=1, mlp_dim=64,
              vocab_size=50, max_len=32, dtype="float32", attention="xla")
  return ModelConfig(**{**base, **changes})


def test_rotary_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 2, 16))

  def score(m, n):
    qm = apply_rotary(q, jnp.full((1, 1), m), 10_000.0)
    kn = apply_rotary(k, jnp.full((1, 1), n), 10_000.0)
    return jnp.sum(qm * kn, axis=-1)

  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(score(0, 5), score(20, 25), rtol=1e-5, atol=1e-5)
  # ... and it does depend on the offset.
  assert np.abs(np.asarray(score(3, 1) - score(3, 2))).max() > 1e-3


def test_rotary_is_identity_at_position_zero_and_keeps_norms():
  x = jax.random.normal(jax.random.key(1), (2, 5, 3, 8))
  np.testing.assert_allclose(
      apply_rotary(x, jnp.zeros((2, 5), jnp.int32), 10_000.0), x, atol=1e-7)
  rotated = apply_rotary(x, jnp.arange(10).reshape(2, 5), 10_000.0)
  np.testing.assert_allclose(
      jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_grouped_query_attention_equals_mha_with_shared_kv_heads(position):
  """One kv head shared by 4 query heads == 4 kv heads holding copies of it."""
  gqa = _config(num_kv_heads=1, position=position)
  mha = _config(num_kv_heads=None, position=position)
  x = jax.random.normal(jax.random.key(2), (2, 7, 32))
  positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
  mask = AttentionMask(causal=True)
  params = random_params(gqa)["transformer"]["layer_0"]["attention"]
  assert params["key"]["kernel"].shape == (32, 1, 8)
  expanded = dict(params)
  for proj in ("key", "value"):
    expanded[proj] = {
        "kernel": jnp.repeat(params[proj]["kernel"], 4, axis=1),
        "bias": jnp.repeat(params[proj]["bias"], 4, axis=0),
    }
  out_gqa, _ = jax.jit(SelfAttention(gqa).apply)(
      {"params": params}, x, positions, mask)
  out_mha, _ = jax.jit(SelfAttention(mha).apply)(
      {"params": expanded}, x, positions, mask)
  np.testing.assert_allclose(out_gqa, out_mha, rtol=1e-5, atol=1e-6)


def test_cache_write_puts_each_row_at_its_own_slot():
  cache = LayerCache(jnp.zeros((2, 5, 1, 1)), jnp.zeros((2, 5, 1, 1)))
  new = jnp.array([1.0, 2.0]).reshape(2, 1, 1, 1)
  written = cache.write(new, -new, jnp.array([0, 3]))
  np.testing.assert_array_equal(written.keys[:, :, 0, 0],
                                [[1, 0, 0, 0, 0], [0, 0, 0, 2, 0]])
  np.testing.assert_array_equal(written.values, -written.keys)
  padded = LayerCache(new, new).padded_to(4)
  chex.assert_shape(padded.keys, (2, 4, 1, 1))
  np.testing.assert_array_equal(padded.keys[:, 1:], 0.0)


def test_attention_over_cache_matches_attention_over_the_sequence():
  """Last query over a cache of the same keys == last row of full causal attention."""
  cfg = _config(position="rotary", num_kv_heads=2)
  x = jax.random.normal(jax.random.key(4), (1, 6, 32))
  positions = jnp.arange(6)[None]
  apply = jax.jit(SelfAttention(cfg).apply)
  params = {"params": random_params(cfg)["transformer"]["layer_0"]["attention"]}
  full, kv = apply(params, x, positions, AttentionMask(causal=True))
  # Keys of the first five tokens in an 8-slot cache; the sixth is written now.
  cache = LayerCache(kv.keys[:, :5], kv.values[:, :5]).padded_to(8)
  visible = jnp.arange(8)[None] <= 5
  last, new_cache = apply(
      params, x[:, 5:], positions[:, 5:],
      AttentionMask(key_padding_mask=visible), cache, jnp.array([5]))
  np.testing.assert_allclose(last[:, 0], full[:, 5], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_cache.keys[:, :6], kv.keys, rtol=1e-5, atol=1e-7)
