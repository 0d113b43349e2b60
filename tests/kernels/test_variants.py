"""The kernel's variants (kernels.variants) against the reference: values and every gradient.

Bias (with d bias), per-head mask, local window, soft-cap, dropout, value
head dim, log-sum-exp output and top-left alignment, alone and combined with
GQA, causal, segment ids, padding and odd lengths. Through Pallas'
interpreter on CPU; the `gpu`-marked copy compiles them through Triton.
Dropout is compared with the reference exactly: both draw the same bits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.kernels import (
  BlockSizes,
  dot_product_attention,
  flash_attention,
  reference_attention,
  variants,
)
from tests.kernels import variant_cases
from tests.kernels.attention_cases import assert_close

SMALL_BLOCKS = BlockSizes(
    block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
    block_q_dq=32, block_k_dq=16,
)
_inputs = functools.partial(  # the cases' defaults: GQA 2:1, 37 (odd) long, float32
    variant_cases.inputs, batch=1, q_len=37, kv_len=37, heads=2, kv_heads=1, head_dim=32,
    dtype=jnp.float32)
_resolve = functools.partial(variant_cases.resolve, segment_rate=0.1)
_value_and_grads = variant_cases.value_and_grads
INTERPRET = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="triton", marks=pytest.mark.gpu),
]





CASES = {
    # name: (input shapes, variant and mask keyword arguments). Inputs are
    # batch 1, 2 query heads on 1 key/value head (GQA), 37 (odd) long, unless
    # a case says otherwise.
    "bias_per_head_shared_by_batch_causal": (
        dict(batch=2, bias_shape=(1, 2, 37, 37)), dict(causal=True)),
    "bias_full_cross_attention_segments": (
        dict(batch=2, q_len=17, kv_len=45, bias_shape=(2, 2, 17, 45)),
        dict(segment_ids="q", kv_segment_ids="kv")),
    "key_bias_broadcast_padding": (
        dict(batch=2, q_len=17, kv_len=45, bias_shape=(2, 1, 1, 45)),
        dict(key_padding_mask="padding")),
    "window_causal_segments": (
        dict(q_len=70, kv_len=70), dict(causal=True, local_window_size=(8, 0),
                                        segment_ids="q")),
    "window_two_sided": (dict(q_len=45, kv_len=45), dict(local_window_size=(5, 3))),
    "soft_cap_bias_causal": (
        dict(bias_shape=(1, 1, 37, 37)), dict(causal=True, logits_soft_cap=2.0)),
    "dropout_causal_segments": (
        dict(batch=2), dict(causal=True, segment_ids="q", dropout_rate=0.3)),
    "dropout_bias_window_soft_cap": (
        dict(bias_shape=(1, 2, 37, 37)),
        dict(causal=True, local_window_size=12, logits_soft_cap=3.0,
             dropout_rate=0.2)),
    "value_head_dim_48_causal_bias": (
        dict(v_head_dim=48, bias_shape=(1, 2, 37, 37)), dict(causal=True)),
    "lse_with_gradient_padding_causal": (
        dict(batch=2), dict(causal=True, key_padding_mask="padding",
                            return_lse=True)),
    "top_left_causal_more_keys": (
        dict(q_len=20, kv_len=50), dict(causal=True, causal_alignment="top_left")),
    "top_left_window_more_queries": (
        dict(q_len=50, kv_len=20),
        dict(local_window_size=(4, 2), causal_alignment="top_left")),
    "per_head_mask_causal": (dict(batch=2), dict(causal=True, mask="per_head")),
    "bf16_bias_window_soft_cap": (
        dict(bias_shape=(1, 2, 37, 37), dtype=jnp.bfloat16),
        dict(causal=True, local_window_size=(9, 0), logits_soft_cap=4.0)),
}



@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("name", list(CASES))
def test_variant_values_and_gradients_match_reference(name, interpret):
  shapes, kwargs = CASES[name]
  seed = sum(map(ord, name))
  q, k, v, bias, d_out, d_lse = _inputs(seed, **shapes)
  kwargs = _resolve(kwargs, q, k, seed)
  cotangent = (d_out, d_lse) if kwargs.get("return_lse") else d_out
  out, grads = _value_and_grads(
      functools.partial(flash_attention, block_sizes=SMALL_BLOCKS,
                        interpret=interpret),
      q, k, v, bias, cotangent, **kwargs)
  variant_cases.assert_matches_reference(out, grads, q, k, v, bias, cotangent, **kwargs)


def test_philox_matches_random123_known_answers():
  # Known-answer vectors of Philox-4x32-10 from Random123's kat_vectors.
  vectors = [
      ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
      ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2,
       (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
      ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
       (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
  ]
  for counter, key, expected in vectors:
    words = variants.philox4x32(tuple(jnp.uint32(c) for c in counter),
                                tuple(jnp.uint32(x) for x in key))
    assert [int(w) for w in words] == list(expected)


def test_dropout_keep_rate_and_scale():
  rate = 0.3
  scale = np.asarray(variants.dropout_scale(
      jnp.array([1234, 5678], jnp.uint32), 1, 3, jnp.arange(512)[:, None],
      jnp.arange(512)[None, :], rate))
  np.testing.assert_array_equal(np.unique(scale), [0.0, np.float32(1 / (1 - rate))])
  kept = (scale > 0).mean()
  # 2**18 Bernoulli(0.7) draws: standard deviation 9e-4; 5 of them.
  np.testing.assert_allclose(kept, 1 - rate, atol=4.5e-3)
  # Rows, columns, heads and batches draw independent-looking bits: no
  # row or column keeps far more than the rest.
  assert np.abs((scale > 0).mean(axis=1) - (1 - rate)).max() < 0.1
  assert np.abs((scale > 0).mean(axis=0) - (1 - rate)).max() < 0.1


@pytest.mark.parametrize("interpret", INTERPRET)
def test_dropout_mask_is_the_references_and_reproducible(interpret):
  # With q = 0 every visible key gets P = 1/n; with v = the identity the
  # output shows the mask itself: out[i, j] = keep[i, j] / (n (1 - rate)).
  n, rate = 40, 0.25
  q = jnp.zeros((2, n, 2, 16))
  k = jnp.zeros((2, n, 1, 16))
  v = jnp.broadcast_to(jnp.eye(n)[None, :, None, :], (2, n, 1, n))
  run = lambda f, rng: np.asarray(f(q, k, v, dropout_rate=rate, dropout_rng=rng))
  kernel = functools.partial(flash_attention, block_sizes=SMALL_BLOCKS,
                             interpret=interpret)
  out = run(kernel, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, run(kernel, jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(out > 0, run(reference_attention,
                                             jax.random.PRNGKey(0)) > 0)
  np.testing.assert_allclose(out[out > 0], 1 / (n * (1 - rate)), rtol=1e-6)
  other = run(kernel, jax.random.PRNGKey(1))
  assert (other > 0).mean() > 0.6 and ((other > 0) != (out > 0)).mean() > 0.2
  # Heads and batch rows draw different masks.
  assert ((out[0, :, 0] > 0) != (out[0, :, 1] > 0)).mean() > 0.2
  assert ((out[0] > 0) != (out[1] > 0)).mean() > 0.2


@pytest.mark.parametrize("interpret", INTERPRET)
def test_blocks_outside_the_window_are_skipped_not_masked(interpret):
  blocks = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16,
                      block_q_dq=16, block_k_dq=16)
  q, k, v, _, d_out, _ = _inputs(21, batch=1, q_len=64, kv_len=64, heads=2,
                                 kv_heads=1)
  kernel = functools.partial(flash_attention, block_sizes=blocks, interpret=interpret)
  variant_cases.assert_window_skips_blocks(kernel, q, k, v, d_out)
  # And the finite part is right.
  ref, _ = _value_and_grads(reference_attention, q, k, v, None, d_out,
                            **variant_cases.WINDOW)
  clean, _ = _value_and_grads(kernel, q, k, v, None, d_out, **variant_cases.WINDOW)
  assert_close(clean, ref, 2e-5, "output")


def test_chunks_of_keys_combine_exactly_through_the_lse():
  # Ring / blockwise attention: attention over two halves of the keys,
  # merged by their log-sum-exps, is attention over all keys: values and
  # gradients (the lse's own cotangent enters the backward).
  q, k, v, _, d_out, _ = _inputs(5, batch=1, q_len=33, kv_len=64, heads=2,
                                 kv_heads=1)
  kernel = functools.partial(flash_attention, block_sizes=SMALL_BLOCKS,
                             interpret=True, return_lse=True)

  def merged(q, k, v):
    out1, lse1 = kernel(q, k[:, :32], v[:, :32])
    out2, lse2 = kernel(q, k[:, 32:], v[:, 32:])
    lse = jnp.logaddexp(lse1, lse2)
    weight = lambda part: jnp.exp(part - lse).transpose(0, 2, 1)[..., None]
    return out1 * weight(lse1) + out2 * weight(lse2)

  out, grads = _value_and_grads(lambda q, k, v: merged(q, k, v), q, k, v, None,
                                d_out)
  ref, ref_grads = _value_and_grads(reference_attention, q, k, v, None, d_out)
  assert_close(out, ref, 2e-5, "output")
  for name, grad, want in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert_close(grad, want, 1e-4, name)


def test_unbatched_input_is_a_batch_of_one():
  q, k, v, bias, _, _ = _inputs(8, bias_shape=(1, 2, 37, 37))
  for implementation in ("xla", "pallas"):
    out, lse = dot_product_attention(
        q[0], k[0], v[0], bias=bias[0], causal=True, return_lse=True,
        implementation=implementation, block_sizes=SMALL_BLOCKS)
    want, want_lse = reference_attention(q, k, v, bias=bias, causal=True,
                                         return_lse=True)
    assert out.shape == q.shape[1:] and lse.shape == (2, 37)
    assert_close(np.asarray(out), np.asarray(want[0]), 2e-5, implementation)
    assert_close(np.asarray(lse), np.asarray(want_lse[0]), 2e-5, implementation)


@pytest.mark.parametrize("kwargs, message", [
    (dict(local_window_size=-1), "local_window_size must be an int >= 0"),
    (dict(local_window_size=(1, 2, 3)), "local_window_size must be"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap must be a finite number > 0"),
    (dict(dropout_rate=0.1), "dropout_rate > 0 needs dropout_rng"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.PRNGKey(0)),
     r"dropout_rate must be in \[0, 1\)"),
    (dict(bias=jnp.zeros((2, 3, 8, 8))), r"bias shape \(2, 3, 8, 8\) does not broadcast"),
    (dict(bias=jnp.zeros((8, 8))), "bias must have rank 4"),
    (dict(mask=jnp.ones((1, 1, 8, 8), jnp.int32)), "mask must be bool"),
    (dict(causal_alignment="center"), "causal_alignment must be one of"),
])
def test_bad_variant_arguments_are_named(kwargs, message):
  q = jnp.zeros((2, 8, 2, 16))
  for implementation in ("xla", "pallas"):
    with pytest.raises(ValueError, match=message):
      dot_product_attention(q, q, q, implementation=implementation, **kwargs)


def test_cudnn_refuses_the_variants_it_is_not_wired_for():
  # jax.nn passes cuDNN a bias and a window; the soft-cap and dropout it has not.
  q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match="'cudnn' is not wired for logits_soft_cap"):
    dot_product_attention(q, q, q, logits_soft_cap=4.0, local_window_size=4,
                          implementation="cudnn")
