"""The TPU kernel's variants against the reference: values and every gradient.

Cases of tests/kernels/test_variants.py (bias with d bias, per-head
mask, local window, soft-cap, dropout, value head dim, log-sum-exp with its
cotangent, top-left alignment, combined with GQA, causal, segment ids,
padding and odd lengths), run through Pallas' TPU interpreter; the
`tpu`-marked copies compile them on a TPU. Dropout matches the reference
exactly: both draw the same Philox bits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.kernels import TpuBlockSizes, reference_attention, tpu_attention
from tests.kernels import variant_cases
from tests.kernels.test_variants import CASES, _inputs, _resolve, _value_and_grads

SMALL = TpuBlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                      block_q_dkv=32, block_k_dkv=16)
# Ten of the fourteen shared cases (the interpreter is slow): each variant
# and each broadcast layout at least once. Left out, as covered by these:
# bias_per_head_shared_by_batch_causal (soft_cap_bias_causal, value_head_dim
# _48_causal_bias), window_two_sided (dropout_bias_window_soft_cap's
# symmetric window), dropout_causal_segments (the same, and the dropout mask
# test below), top_left_causal_more_keys (top_left_window_more_queries).
NAMES = [name for name in CASES if name not in (
    "bias_per_head_shared_by_batch_causal", "window_two_sided",
    "dropout_causal_segments", "top_left_causal_more_keys")]
assert len(NAMES) == len(CASES) - 4, "a left-out case was renamed"
INTERPRET = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="tpu", marks=pytest.mark.tpu),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("name", NAMES)
def test_variant_values_and_gradients_match_reference(name, interpret):
  shapes, kwargs = CASES[name]
  seed = sum(map(ord, name))
  q, k, v, bias, d_out, d_lse = _inputs(seed, **shapes)
  kwargs = _resolve(kwargs, q, k, seed)
  cotangent = (d_out, d_lse) if kwargs.get("return_lse") else d_out
  out, grads = _value_and_grads(
      functools.partial(tpu_attention, block_sizes=SMALL if interpret else None,
                        interpret=interpret),
      q, k, v, bias, cotangent, **kwargs)
  variant_cases.assert_matches_reference(out, grads, q, k, v, bias, cotangent, **kwargs)


def test_blocks_outside_the_window_are_skipped_not_masked():
  q, k, v, _, d_out, _ = _inputs(21, batch=1, q_len=64, kv_len=64, heads=2,
                                 kv_heads=1)
  kernel = functools.partial(tpu_attention, block_sizes=TpuBlockSizes(*(16,) * 6),
                             interpret=True)
  variant_cases.assert_window_skips_blocks(kernel, q, k, v, d_out)


def test_dropout_mask_is_the_references():
  # With q = 0 every visible key gets P = 1/n; with v = the identity the
  # output shows the mask itself: out[i, j] = keep[i, j] / (n (1 - rate)).
  n, rate = 40, 0.25
  q = jnp.zeros((2, n, 2, 16))
  k = jnp.zeros((2, n, 1, 16))
  v = jnp.broadcast_to(jnp.eye(n)[None, :, None, :], (2, n, 1, n))
  run = lambda f, rng: np.asarray(f(q, k, v, dropout_rate=rate, dropout_rng=rng))
  kernel = functools.partial(tpu_attention, block_sizes=SMALL, interpret=True)
  out = run(kernel, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out > 0, run(reference_attention,
                                             jax.random.PRNGKey(0)) > 0)
  np.testing.assert_allclose(out[out > 0], 1 / (n * (1 - rate)), rtol=1e-6)
  assert ((out[0, :, 0] > 0) != (out[0, :, 1] > 0)).mean() > 0.2
