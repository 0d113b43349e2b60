"""The Pallas kernel against the float32 reference: values and all gradients.

On CPU every case runs through Pallas' interpreter; the `gpu`-marked copies
run the same checks compiled through Triton on an NVIDIA GPU.
"""

import functools
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.kernels import BlockSizes, flash_attention, masking, reference_attention
from tests.kernels.attention_cases import (
  TOLERANCE,
  Case,
  assert_close,
  assert_other_segments_skipped,
  make_inputs,
  nan_rows,
  output_and_grads,
  reference_output_and_grads,
)

# Small tiles, so that short test sequences still span several blocks and
# every loop bound, tail and skip is exercised.
SMALL_BLOCKS = BlockSizes(
    block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
    block_q_dq=32, block_k_dq=16,
)

f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
GRID = [
    # Lengths that are not multiples of any block: 1, 17, 100, 257.
    Case(q_len=1, kv_len=1),
    Case(q_len=17, kv_len=17, causal=True),
    Case(q_len=100, kv_len=100, heads=4, kv_heads=2, causal=True, masks="segments"),
    Case(batch=1, q_len=257, kv_len=257, heads=1, kv_heads=1, causal=True),
    Case(q_len=100, kv_len=100, heads=3, kv_heads=1, masks="padding"),  # MQA
    Case(q_len=64, kv_len=64, heads=4, kv_heads=2, causal=True, masks="both"),
    # Cross-attention, both ways round; causal is aligned bottom-right.
    Case(q_len=17, kv_len=100, causal=True),
    Case(q_len=100, kv_len=17, causal=True),  # the first 83 rows see nothing
    Case(q_len=33, kv_len=70, heads=4, kv_heads=1, masks="segments"),
    # Head dims beyond 32 (80 and 96 are padded to 128 inside the wrapper).
    Case(q_len=40, kv_len=40, head_dim=64, causal=True),
    Case(batch=1, q_len=40, kv_len=40, head_dim=80),
    Case(batch=1, q_len=40, kv_len=40, head_dim=96, causal=True, masks="padding"),
    Case(batch=1, q_len=40, kv_len=40, head_dim=128, masks="segments"),
    Case(batch=1, q_len=40, kv_len=40, heads=1, kv_heads=1, head_dim=256, causal=True),
    # Half precision, float32 accumulation.
    Case(q_len=100, kv_len=100, heads=4, kv_heads=2, causal=True, dtype=bf16),
    Case(q_len=57, kv_len=57, masks="both", dtype=bf16),
    Case(q_len=64, kv_len=64, head_dim=64, causal=True, dtype=f16),
    Case(q_len=17, kv_len=100, heads=4, kv_heads=1, masks="padding", dtype=f16),
]

INTERPRET = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="triton", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_values_and_gradients_match_reference(case, interpret):
  q, k, v, cotangent, masks = make_inputs(case, seed=zlib.crc32(case.id.encode()))
  blocks = SMALL_BLOCKS
  if case.head_dim == 256:  # Keep the dK/dV tiles within shared memory.
    blocks = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                        block_q_dq=32, block_k_dq=16, num_stages_fwd=1,
                        num_stages_bwd=1)
  out, grads = output_and_grads(
      flash_attention, q, k, v, cotangent, causal=case.causal,
      block_sizes=blocks, interpret=interpret, **masks,
  )
  ref_out, ref_grads = reference_output_and_grads(case, q, k, v, cotangent, masks)
  out_tol, grad_tol = TOLERANCE[case.dtype]
  assert out.shape == ref_out.shape
  assert_close(out, ref_out, out_tol, "output")
  for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert_close(grad, ref, grad_tol, name)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_default_block_sizes(interpret):
  case = Case(batch=1, q_len=200, kv_len=200, heads=2, kv_heads=1,
              head_dim=64, causal=True)
  q, k, v, cotangent, masks = make_inputs(case, seed=3)
  out, grads = output_and_grads(flash_attention, q, k, v, cotangent,
                                causal=True, interpret=interpret)
  ref_out, ref_grads = reference_output_and_grads(case, q, k, v, cotangent, masks)
  assert_close(out, ref_out, 2e-5, "output")
  for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert_close(grad, ref, 1e-4, name)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_fully_masked_rows_give_zero_output_and_gradients(interpret):
  case = Case(batch=2, q_len=24, kv_len=40, heads=2, kv_heads=1)
  q, k, v, cotangent, _ = make_inputs(case, seed=5)
  # Batch 0: every key padded. Batch 1: queries of segment 7 find no key.
  padding = jnp.stack([jnp.zeros(40, bool), jnp.ones(40, bool)])
  q_segments = jnp.stack([jnp.zeros(24, jnp.int32),
                          jnp.where(jnp.arange(24) < 10, 7, 1)])
  kv_segments = jnp.ones((2, 40), jnp.int32)
  out, (dq, dk, dv) = output_and_grads(
      flash_attention, q, k, v, cotangent, key_padding_mask=padding,
      segment_ids=q_segments, kv_segment_ids=kv_segments,
      block_sizes=SMALL_BLOCKS, interpret=interpret,
  )
  for x in (out, dq, dk, dv):
    assert np.all(np.isfinite(x))
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(dq[0], 0.0)
  np.testing.assert_array_equal(dk[0], 0.0)
  np.testing.assert_array_equal(dv[0], 0.0)
  np.testing.assert_array_equal(out[1, :10], 0.0)
  np.testing.assert_array_equal(dq[1, :10], 0.0)
  assert np.abs(out[1, 10:]).min() > 0.0
  # The reference agrees on the rows that do see keys, and on the zeros.
  ref = reference_attention(q, k, v, key_padding_mask=padding,
                            segment_ids=q_segments, kv_segment_ids=kv_segments)
  assert_close(out, np.asarray(ref), 2e-5, "output")


@pytest.mark.parametrize("interpret", INTERPRET)
def test_causal_rows_before_the_first_key_are_zero(interpret):
  # q_len > kv_len, bottom-right: query i sees keys j <= i - (q_len - kv_len).
  case = Case(batch=1, q_len=50, kv_len=20, causal=True)
  q, k, v, _, _ = make_inputs(case, seed=9)
  out = flash_attention(q, k, v, causal=True, block_sizes=SMALL_BLOCKS,
                        interpret=interpret)
  np.testing.assert_array_equal(np.asarray(out[:, :30]), 0.0)
  # The last query sees every key: plain softmax over all of them.
  full = reference_attention(q[:, -1:], k, v)
  np.testing.assert_allclose(np.asarray(out[:, -1:]), np.asarray(full),
                             atol=2e-5)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_causally_hidden_blocks_are_skipped_not_masked(interpret):
  # NaN in a block nobody may see poisons any tile that loads it (0 * NaN is
  # NaN), so finite results prove the hidden tiles were never computed.
  blocks = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16,
                      block_q_dq=16, block_k_dq=16)
  case = Case(batch=1, q_len=64, kv_len=64, causal=True)
  q, k, v, cotangent, _ = make_inputs(case, seed=11)
  run = functools.partial(output_and_grads, flash_attention, causal=True,
                          block_sizes=blocks, interpret=interpret)
  out, _ = run(q, k, nan_rows(v, 48, 64), cotangent)
  assert np.all(np.isfinite(out[:, :48])), "a future key block was visited"
  _, (_, dk, dv) = run(nan_rows(q, 0, 16), k, v, cotangent)
  assert np.all(np.isfinite(dk[:, 16:])), "dK visited a hidden query block"
  assert np.all(np.isfinite(dv[:, 16:])), "dV visited a hidden query block"


@pytest.mark.parametrize("interpret", INTERPRET)
def test_blocks_of_other_segments_are_skipped(interpret):
  blocks = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16,
                      block_q_dq=16, block_k_dq=16)
  assert_other_segments_skipped(
      functools.partial(flash_attention, block_sizes=blocks, interpret=interpret),
      Case(batch=1, q_len=64, kv_len=64))


def test_segment_block_ranges_cover_every_block_that_shares_an_id():
  # The kernels visit only blocks inside these ranges, so a block pair that
  # shares an id must lie inside; for sorted ids (packed documents, padding
  # at the end) every block inside must share one, or work is wasted.
  rng = np.random.default_rng(0)
  pad = masking.PAD_SEGMENT
  unsorted_q = rng.integers(0, 5, (2, 64))
  unsorted_kv = np.where(rng.random((2, 96)) < 0.2, pad, rng.integers(0, 5, (2, 96)))
  sorted_q = np.sort(rng.integers(0, 6, (2, 64)))
  sorted_kv = np.concatenate([np.sort(rng.integers(0, 6, (2, 80))),
                              np.full((2, 16), pad)], axis=1)
  for q_ids, kv_ids, exact in ((unsorted_q, unsorted_kv, False),
                               (sorted_q, sorted_kv, True)):
    kv_range, q_range = map(np.asarray, masking.segment_block_ranges(
        jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32), 16, 8))
    for b in range(2):
      for i in range(64 // 16):
        for j in range(96 // 8):
          meet = np.isin(q_ids[b, 16 * i:16 * i + 16], kv_ids[b, 8 * j:8 * j + 8]).any()
          in_kv_range = kv_range[b, i, 0] <= j < kv_range[b, i, 1]
          in_q_range = q_range[b, j, 0] <= i < q_range[b, j, 1]
          if meet:
            assert in_kv_range and in_q_range, (b, i, j, kv_range[b, i], q_range[b, j])
          elif exact:
            assert not in_kv_range and not in_q_range, (b, i, j)
