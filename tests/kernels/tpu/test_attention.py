"""The TPU kernel against the float32 reference: values and all gradients.

On CPU every case runs in Pallas' TPU interpreter (`pltpu.InterpretParams`,
which simulates VMEM, SMEM, the scalar prefetch and the grid's order); the
`tpu`-marked copies run the same checks compiled on a TPU. Interpreted runs
cost ~5 ms per grid step, so the tiles are small (several blocks per
sequence) and the shapes few.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.kernels import (
  TpuBlockSizes,
  dot_product_attention,
  reference_attention,
  resolve_implementation,
  target_device,
  tpu_attention,
)
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
from tests.kernels.stand_ins import CPU, TPU

# Small tiles: short sequences span several blocks, so every range, skip,
# clamp and tail is exercised (the compiled floors of 32 / 128 do not apply
# in the interpreter).
SMALL = TpuBlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                      block_q_dkv=32, block_k_dkv=16)
UNIFORM = TpuBlockSizes(*(16,) * 6)

bf16 = jnp.bfloat16
GRID = [
    Case(q_len=1, kv_len=1),
    # GQA 2:1 with packed sequences; MQA with key padding.
    Case(batch=1, q_len=50, kv_len=50, heads=4, kv_heads=2, causal=True,
         masks="segments"),
    Case(batch=1, q_len=50, kv_len=50, heads=3, kv_heads=1, masks="padding"),
    # Cross-attention both ways round; causal aligned bottom-right (in the
    # second the first 43 rows see no key: zeros, zero gradients).
    Case(batch=1, q_len=17, kv_len=60, causal=True),
    Case(batch=1, q_len=60, kv_len=17, heads=1, kv_heads=1, causal=True),
    Case(batch=1, q_len=33, kv_len=45, heads=4, kv_heads=1, masks="both"),
    # The head dims of the brief: 64, 128, 256 (unpadded in the kernel).
    Case(batch=1, q_len=40, kv_len=40, heads=1, kv_heads=1, head_dim=64,
         causal=True, masks="padding"),
    Case(batch=1, q_len=40, kv_len=40, heads=2, kv_heads=1, head_dim=128,
         masks="segments"),
    Case(batch=1, q_len=24, kv_len=24, heads=1, kv_heads=1, head_dim=256,
         causal=True),
    # bfloat16 inputs, float32 accumulation.
    Case(batch=1, q_len=50, kv_len=50, heads=4, kv_heads=2, causal=True,
         masks="both", dtype=bf16),
]

INTERPRET = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="tpu", marks=pytest.mark.tpu),
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_values_and_gradients_match_reference(case, interpret):
  q, k, v, cotangent, masks = make_inputs(case, seed=zlib.crc32(case.id.encode()))
  blocks = SMALL if interpret else None
  out, grads = output_and_grads(
      tpu_attention, q, k, v, cotangent, causal=case.causal,
      block_sizes=blocks, interpret=interpret, **masks)
  ref_out, ref_grads = reference_output_and_grads(case, q, k, v, cotangent, masks)
  out_tol, grad_tol = TOLERANCE[case.dtype]
  assert out.shape == ref_out.shape
  assert_close(out, ref_out, out_tol, "output")
  for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert grad.shape == ref.shape, name
    assert_close(grad, ref, grad_tol, name)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_rows_that_see_no_key_are_zero_with_zero_gradients(interpret):
  case = Case(batch=2, q_len=24, kv_len=40, heads=2, kv_heads=1)
  q, k, v, cotangent, _ = make_inputs(case, seed=5)
  # Batch 0: every key padded. Batch 1: queries of segment 7 find no key.
  padding = jnp.stack([jnp.zeros(40, bool), jnp.ones(40, bool)])
  q_segments = jnp.stack([jnp.zeros(24, jnp.int32),
                          jnp.where(jnp.arange(24) < 10, 7, 1)])
  kv_segments = jnp.ones((2, 40), jnp.int32)
  out, (dq, dk, dv) = output_and_grads(
      tpu_attention, q, k, v, cotangent, key_padding_mask=padding,
      segment_ids=q_segments, kv_segment_ids=kv_segments,
      block_sizes=UNIFORM if interpret else None, interpret=interpret)
  for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
    assert np.all(np.isfinite(x)), name
    np.testing.assert_array_equal(x[0], 0.0, err_msg=name)
  np.testing.assert_array_equal(out[1, :10], 0.0)
  np.testing.assert_array_equal(dq[1, :10], 0.0)
  assert np.abs(out[1, 10:]).min() > 0.0


def test_causally_hidden_blocks_are_skipped_not_masked():
  # NaN in a block nobody may see poisons any tile that loads it (0 * NaN is
  # NaN), so finite results prove the hidden tiles were never computed.
  case = Case(batch=1, q_len=64, kv_len=64, heads=1, kv_heads=1, causal=True)
  q, k, v, cotangent, _ = make_inputs(case, seed=11)
  run = functools.partial(output_and_grads, tpu_attention, causal=True,
                          block_sizes=UNIFORM, interpret=True)
  out, (dq, _, _) = run(q, k, nan_rows(v, 48, 64), cotangent)
  assert np.all(np.isfinite(out[:, :48])), "a future key block was visited"
  assert np.all(np.isfinite(dq[:, :48])), "dQ visited a future key block"
  _, (_, dk, dv) = run(nan_rows(q, 0, 16), k, v, cotangent)
  assert np.all(np.isfinite(dk[:, 16:])), "dK visited a hidden query block"
  assert np.all(np.isfinite(dv[:, 16:])), "dV visited a hidden query block"


def test_blocks_of_other_segments_are_skipped():
  assert_other_segments_skipped(
      functools.partial(tpu_attention, block_sizes=UNIFORM, interpret=True),
      Case(batch=1, q_len=64, kv_len=64, heads=2, kv_heads=1))


def test_entry_point_dispatches_to_the_tpu_kernel():
  case = Case(batch=1, q_len=40, kv_len=40, heads=2, kv_heads=1, causal=True)
  q, k, v, _, _ = make_inputs(case, seed=17)
  # Off TPU, "tpu" runs interpreted unless told otherwise.
  out = dot_product_attention(q, k, v, causal=True, implementation="tpu",
                              block_sizes=UNIFORM)
  ref = reference_attention(q, k, v, causal=True)
  assert_close(np.asarray(out), np.asarray(ref), TOLERANCE[jnp.float32][0],
               "output")


def test_auto_picks_the_tpu_kernel_on_tpu_backends():
  q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
  with target_device(TPU):
    assert resolve_implementation("auto", q, q, q) == "tpu"
  with target_device(CPU):
    assert resolve_implementation("auto", q, q, q) == "xla"


# Argument checks: no kernel runs.

def test_refuses_float16():
  x = jnp.zeros((1, 8, 2, 64), jnp.float16)
  with pytest.raises(ValueError, match="bfloat16 or float32.*no float16"):
    tpu_attention(x, x, x, interpret=True)


def test_refuses_to_compile_off_tpu():
  if jax.default_backend() == "tpu":
    pytest.skip("this machine has a TPU: the compiled path is allowed")
  x = jnp.zeros((1, 8, 2, 64))
  with pytest.raises(ValueError, match="compiles for TPUs.*interpret=True"):
    tpu_attention(x, x, x)


@pytest.mark.parametrize("field, value, message", [
    ("block_q", 24, "power of two of at least 8"),
    ("block_k_dkv", 4, "power of two of at least 8"),
    ("vmem_limit_bytes", 0, "positive int or None"),
])
def test_block_sizes_are_checked(field, value, message):
  with pytest.raises(ValueError, match=f"TpuBlockSizes.{field}.*{message}"):
    TpuBlockSizes(**{field: value})


def test_tiles_over_the_vmem_limit_are_refused_before_compiling():
  from fusedlm.kernels.tpu.attention import tpu_attention_any_device
  x = jax.ShapeDtypeStruct((1, 4096, 1, 256), jnp.float32)
  big = TpuBlockSizes(block_q=2048, block_k=2048)
  with pytest.raises(ValueError, match="forward kernel need about .* over the"):
    jax.eval_shape(lambda q: tpu_attention_any_device(q, q, q, block_sizes=big), x)
