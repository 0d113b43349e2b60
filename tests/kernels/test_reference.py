"""The reference itself, checked against JAX's own attention and explicit masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.kernels import reference_attention
from tests.kernels.attention_cases import Case, make_inputs


@pytest.mark.parametrize("causal", [False, True])
def test_equal_lengths_match_jax_nn(causal):
  # Where both conventions agree (q_len == kv_len), compare with JAX's XLA path.
  q, k, v, _, _ = make_inputs(Case(q_len=37, kv_len=37, heads=4, kv_heads=2), 0)
  ours = reference_attention(q, k, v, causal=causal)
  theirs = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation="xla")
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


def test_causal_cross_attention_is_aligned_bottom_right():
  # jax.nn aligns top-left, so pass it the bottom-right mask explicitly.
  q, k, v, _, _ = make_inputs(Case(q_len=9, kv_len=30), 1)
  mask = jnp.arange(30)[None, :] <= jnp.arange(9)[:, None] + 21
  ours = reference_attention(q, k, v, causal=True)
  theirs = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None],
                                        implementation="xla")
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


def test_segments_equal_attending_each_segment_alone():
  q, k, v, _, _ = make_inputs(Case(batch=1, q_len=30, kv_len=30), 2)
  segment_ids = jnp.where(jnp.arange(30) < 12, 3, 8)[None]
  packed = reference_attention(q, k, v, causal=True, segment_ids=segment_ids)
  first = reference_attention(q[:, :12], k[:, :12], v[:, :12], causal=True)
  second = reference_attention(q[:, 12:], k[:, 12:], v[:, 12:], causal=True)
  np.testing.assert_allclose(np.asarray(packed),
                             np.concatenate([first, second], axis=1), atol=1e-6)


def test_padding_mask_equals_dropping_the_padded_keys():
  q, k, v, _, _ = make_inputs(Case(batch=1, q_len=10, kv_len=25), 3)
  mask = (jnp.arange(25) < 19)[None]
  padded = reference_attention(q, k, v, key_padding_mask=mask)
  dropped = reference_attention(q, k[:, :19], v[:, :19])
  np.testing.assert_allclose(np.asarray(padded), np.asarray(dropped), atol=1e-6)


def test_fully_masked_rows_are_zero_with_zero_gradients():
  q, k, v, _, _ = make_inputs(Case(batch=1, q_len=6, kv_len=6), 4)
  mask = jnp.zeros((1, 6), bool)
  out = reference_attention(q, k, v, key_padding_mask=mask)
  grads = jax.grad(lambda q, k, v: jnp.sum(reference_attention(
      q, k, v, key_padding_mask=mask)), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)
