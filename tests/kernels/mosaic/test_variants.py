"""The Mosaic GPU kernel's variants (kernels.variants) against the float32 reference.

Bias (with d bias), local window (with block skipping), soft-cap, dropout
(the reference's very bits), log-sum-exp output with its gradient, a value
head dim other than the query/key one, head dim 256 (the backward consumers
split the head dim) and top-left alignment, alone and combined with GQA,
causal, segment ids, padding and odd lengths. On CPU through Mosaic GPU's
interpreter and our shim (CI's second pass, JAX 0.11); the `gpu`-marked
copies run compiled on a Hopper GPU.
"""

import contextlib
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.kernels import (
  MosaicBlockSizes,
  dot_product_attention,
  masking,
  reference_attention,
  variants,
)
from fusedlm.kernels.mosaic import coverage
from fusedlm.kernels.mosaic.attention import _plan, mosaic_attention
from tests.kernels import variant_cases
from tests.kernels.attention_cases import TOLERANCE, assert_close, nan_rows
from tests.kernels.mosaic import interpreter_shim as mosaic_interpret

# The smallest tiles, so short sequences span several CTAs and ring slots.
SMALL = MosaicBlockSizes(block_q=64, block_kv=64, block_q_dq=64, block_kv_dq=64,
                         block_q_dkv=64, block_kv_dkv=64)
f16, bf16 = jnp.float16, jnp.bfloat16
needs_interpreter = pytest.mark.skipif(
    not mosaic_interpret.SUPPORTED, reason=mosaic_interpret.REASON)
_inputs = functools.partial(  # the cases' defaults: GQA 2:1, 100 long, float16
    variant_cases.inputs, batch=1, q_len=100, kv_len=100, heads=2, kv_heads=1, head_dim=64,
    dtype=f16)
_resolve = functools.partial(variant_cases.resolve, segment_rate=0.04)
_value_and_grads = variant_cases.value_and_grads
MODES = [
    pytest.param("interpret", id="interpret", marks=needs_interpreter),
    pytest.param("compiled", id="sm90", marks=pytest.mark.gpu),
]





CASES = {
    # name: (input shapes, variant and mask keyword arguments). Inputs are
    # batch 1, 2 query heads on 1 key/value head, head dim 64, 100 long,
    # float16, unless a case says otherwise.
    # 200 long: the dQ CTA of rows 0..127 skips key tiles 2 and 3, whose d
    # bias must come out zero.
    "bias_per_head_shared_by_batch_causal": (
        dict(batch=2, q_len=200, kv_len=200, bias_shape=(1, 2, 200, 200)),
        dict(causal=True)),
    "bias_full_cross_attention_segments_bf16": (
        dict(q_len=70, kv_len=150, bias_shape=(1, 2, 70, 150), dtype=bf16),
        dict(segment_ids="q", kv_segment_ids="kv")),
    "key_bias_broadcast_padding_head_dim_128": (
        dict(batch=2, q_len=70, kv_len=150, head_dim=128, bias_shape=(2, 1, 1, 150)),
        dict(key_padding_mask="padding")),
    # Windows wide and narrow against 64-wide tiles: masked tiles at both
    # edges and whole ones between (two-sided), skipped tiles (causal).
    "window_two_sided": (dict(q_len=250, kv_len=250), dict(local_window_size=(70, 90))),
    "window_causal_segments": (
        dict(q_len=200, kv_len=200), dict(causal=True, local_window_size=(40, 0),
                                          segment_ids="q")),
    "window_left_only_cross_attention_bf16": (
        dict(q_len=90, kv_len=200, dtype=bf16), dict(local_window_size=(30, None))),
    "soft_cap_bias_causal": (
        dict(bias_shape=(1, 1, 100, 100)), dict(causal=True, logits_soft_cap=2.0)),
    "soft_cap_window_gqa_bf16": (
        dict(heads=4, kv_heads=2, dtype=bf16),
        dict(logits_soft_cap=3.0, local_window_size=20)),
    "dropout_causal_segments": (
        dict(batch=2), dict(causal=True, segment_ids="q", dropout_rate=0.3)),
    "dropout_bias_window_soft_cap": (
        dict(q_len=200, kv_len=200, bias_shape=(1, 2, 200, 200)),
        dict(causal=True, local_window_size=50, logits_soft_cap=3.0,
             dropout_rate=0.2)),
    # Head dim 128 with a soft-cap or dropout: the dK/dV consumers split it.
    "soft_cap_dropout_head_dim_128_gqa_bf16": (
        dict(q_len=150, kv_len=150, heads=4, kv_heads=2, head_dim=128, dtype=bf16),
        dict(causal=True, logits_soft_cap=5.0, dropout_rate=0.1)),
    "value_head_dim_96_causal_bias": (
        dict(v_head_dim=96, bias_shape=(1, 2, 100, 100)), dict(causal=True)),
    "lse_with_gradient_padding_causal": (
        dict(batch=2), dict(causal=True, key_padding_mask="padding",
                            return_lse=True)),
    "top_left_causal_more_queries": (
        dict(q_len=150, kv_len=70), dict(causal=True, causal_alignment="top_left")),
    "head_dim_256_causal_segments_gqa": (
        dict(q_len=150, kv_len=150, heads=4, kv_heads=2, head_dim=256),
        dict(causal=True, segment_ids="q")),
    "head_dims_96_and_200_dropout_window_lse_bf16": (
        dict(q_len=130, kv_len=130, head_dim=96, v_head_dim=200, dtype=bf16),
        dict(local_window_size=(60, 10), dropout_rate=0.1, return_lse=True)),
}



def _interpreter(mode: str):
  if mode == "interpret":
    return mosaic_interpret.mosaic_interpreter(force=False)
  return contextlib.nullcontext()


def _kernel(mode: str, **kwargs):
  interpret = mosaic_interpret.PARAMS if mode == "interpret" else False
  return functools.partial(mosaic_attention, block_sizes=kwargs.pop("blocks", SMALL),
                           interpret=interpret, **kwargs)


def _check_case(name: str, mode: str, blocks: MosaicBlockSizes = SMALL):
  """CASES[name] through the kernel with `blocks`, against the reference."""
  shapes, kwargs = CASES[name]
  seed = sum(map(ord, name))
  q, k, v, bias, d_out, d_lse = _inputs(seed, **shapes)
  kwargs = _resolve(kwargs, q, k, seed)
  cotangent = (d_out, d_lse) if kwargs.get("return_lse") else d_out
  with _interpreter(mode):
    out, grads = _value_and_grads(_kernel(mode, blocks=blocks), q, k, v, bias,
                                  cotangent, **kwargs)
  variant_cases.assert_matches_reference(out, grads, q, k, v, bias, cotangent, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_variant_values_and_gradients_match_reference(name, mode):
  _check_case(name, mode)


# Step M5 (MosaicBlockSizes.dq_atomic): the dK/dV kernel adds dQ up itself,
# with each variant that changes dS (dropout, soft-cap, window, lse).
DQ_ATOMIC_CASES = ["dropout_causal_segments", "window_two_sided",
                   "soft_cap_window_gqa_bf16", "lse_with_gradient_padding_causal"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", DQ_ATOMIC_CASES)
def test_dq_atomic_variants_match_reference(name, mode):
  _check_case(name, mode, dataclasses.replace(SMALL, dq_atomic=1))


# Step M8 (MosaicBlockSizes.fwd_overlap): the forward's S = QK^T of one key
# tile and PV of the one before run together, with each variant that enters
# the softmax (bias, window, soft-cap, dropout, lse) and head dims 128 / 256.
FWD_OVERLAP_CASES = ["dropout_bias_window_soft_cap", "key_bias_broadcast_padding_head_dim_128",
                     "window_left_only_cross_attention_bf16",
                     "lse_with_gradient_padding_causal", "head_dim_256_causal_segments_gqa"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FWD_OVERLAP_CASES)
def test_fwd_overlap_variants_match_reference(name, mode):
  _check_case(name, mode, dataclasses.replace(SMALL, fwd_overlap=1))


@pytest.mark.parametrize("mode", MODES)
def test_dropout_mask_is_the_references_and_reproducible(mode):
  # With q = 0 every visible key gets P = 1/n; with v = the identity the
  # output shows the mask itself: out[i, j] = keep[i, j] / (n (1 - rate)).
  n, rate = 64, 0.25
  q = jnp.zeros((2, n, 2, 64), f16)
  k = jnp.zeros((2, n, 1, 64), f16)
  v = jnp.broadcast_to(jnp.eye(n, dtype=f16)[None, :, None, :], (2, n, 1, n))
  kernel = _kernel(mode)
  run = lambda f, rng: np.asarray(
      f(q, k, v, dropout_rate=rate, dropout_rng=rng), np.float32)
  with _interpreter(mode):
    out = run(kernel, jax.random.PRNGKey(0))
    again = run(kernel, jax.random.PRNGKey(0))
    other = run(kernel, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(out, again)
  ref = run(reference_attention, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out > 0, ref > 0)
  np.testing.assert_allclose(out[out > 0], 1 / (n * (1 - rate)), rtol=1e-3)
  assert (other > 0).mean() > 0.6 and ((other > 0) != (out > 0)).mean() > 0.2
  # Heads and batch rows draw different masks.
  assert ((out[0, :, 0] > 0) != (out[0, :, 1] > 0)).mean() > 0.2
  assert ((out[0] > 0) != (out[1] > 0)).mean() > 0.2


@pytest.mark.parametrize("mode", MODES)
def test_tiles_outside_the_window_are_skipped_not_masked(mode):
  # Row i sees keys i-63..i. With 64-wide tiles, query rows 128..255 (the
  # second forward / dQ CTA) never need key tile 0, and key tile 1 (keys
  # 64..127) is seen by no row past 190, so query tile 3 (192..255) is
  # skipped by the dK/dV CTA of key tiles 0 and 1. NaN in a tile that is
  # loaded poisons it (0 * NaN is NaN).
  q, k, v, _, d_out, _ = _inputs(21, q_len=256, kv_len=256)
  run = functools.partial(_value_and_grads, _kernel(mode), causal=True,
                          local_window_size=(63, 0))
  with _interpreter(mode):
    out, (dq, _, _) = run(q, nan_rows(k, 0, 64), nan_rows(v, 0, 64), None, d_out)
    _, (_, dk, dv) = run(nan_rows(q, 192, 256), k, v, None, d_out)
    clean, _ = run(q, k, v, None, d_out)
  assert np.all(np.isfinite(out[:, 128:])), "a key tile left of the window was visited"
  assert np.all(np.isfinite(dq[:, 128:])), "dQ visited a key tile left of the window"
  assert np.all(np.isfinite(dk[:, :128])), "dK visited a query tile past the window"
  assert np.all(np.isfinite(dv[:, :128])), "dV visited a query tile past the window"
  ref, _ = _value_and_grads(reference_attention, q.astype(jnp.float32),
                            k.astype(jnp.float32), v.astype(jnp.float32), None,
                            d_out.astype(jnp.float32), causal=True,
                            local_window_size=(63, 0))
  assert_close(clean, ref, TOLERANCE[f16][0], "output")


@needs_interpreter
def test_entry_point_passes_the_variants_to_mosaic():
  q, k, v, bias, _, _ = _inputs(4, bias_shape=(1, 2, 100, 100))
  kwargs = dict(causal=True, bias=bias, local_window_size=(30, 0),
                logits_soft_cap=4.0, return_lse=True)
  with mosaic_interpret.mosaic_interpreter(force=False):
    out, lse = dot_product_attention(
        q, k, v, implementation="mosaic", block_sizes=SMALL,
        interpret=mosaic_interpret.PARAMS, **kwargs)
  up = lambda x: x.astype(jnp.float32)
  kwargs["bias"] = up(bias)
  ref, ref_lse = reference_attention(up(q), up(k), up(v), **kwargs)
  assert_close(np.asarray(out, np.float32), np.asarray(ref), TOLERANCE[f16][0], "output")
  assert_close(np.asarray(lse), np.asarray(ref_lse), TOLERANCE[f16][0], "lse")


def test_bias_at_head_dim_256_is_refused_for_shared_memory():
  x = jnp.zeros((1, 8, 2, 256), f16)
  with pytest.raises(ValueError, match="shared memory in the forward kernel.*with a bias"):
    mosaic_attention(x, x, x, bias=jnp.zeros((1, 2, 8, 8), f16), interpret=True)


@pytest.mark.parametrize("bias_dtype", [None, jnp.float32, f16])
@pytest.mark.parametrize("variant", [{}, dict(logits_soft_cap=30.0),
                                     dict(dropout_rate=0.1)])
def test_coverage_takes_exactly_the_calls_the_kernel_plans(variant, bias_dtype):
  """"auto" sends mosaic what its planner accepts (kernels.mosaic.coverage)."""
  for d, dv in itertools.product((32, 64, 96, 128, 192, 256, 320), (64, 128, 256)):
    shape = masking.AttentionShape(2, 100, 100, 4, 2, d, dv)
    given = list(variant) + ([] if bias_dtype is None else ["bias"])
    refusal = coverage.refusal(dtype=f16, head_dim=d, v_head_dim=dv, variants=given)
    var = variants.Variants(soft_cap=variant.get("logits_soft_cap"),
                            dropout_rate=variant.get("dropout_rate", 0.0))
    try:
      _plan(shape, f16, bias_dtype, var, None)
      planned = None
    except ValueError as e:
      planned = str(e)
    assert (refusal is None) == (planned is None), (d, dv, refusal, planned)
  assert coverage.refusal(dtype=f16, head_dim=64, v_head_dim=64, variants=["mask"]) == (
      "mosaic does not take mask")
  assert "bfloat16 or float16" in coverage.refusal(dtype=jnp.float32, head_dim=64,
                                                   v_head_dim=64)
