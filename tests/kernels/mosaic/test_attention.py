"""The Mosaic GPU (Hopper) kernel against the float32 reference: values and gradients.

On CPU every case runs in Pallas' Mosaic GPU interpreter, which needs JAX >=
0.11 and our shim (`tests/kernels/mosaic/interpreter_shim.py`); CI's second pass
(Python 3.12, JAX 0.11.2) runs them, the first pass (JAX 0.10.2) skips them
with that reason. The `gpu`-marked copies run compiled on a Hopper GPU. The
argument checks run everywhere.
"""

import contextlib
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.kernels import MosaicBlockSizes, dot_product_attention
from fusedlm.kernels.mosaic.attention import mosaic_attention
from tests.kernels.attention_cases import (
  TOLERANCE,
  Case,
  assert_close,
  make_inputs,
  output_and_grads,
  reference_output_and_grads,
)
from tests.kernels.mosaic import interpreter_shim as mosaic_interpret

# The smallest tiles, so short sequences span several CTAs and ring slots.
SMALL = MosaicBlockSizes(block_q=64, block_kv=64, block_q_dq=64, block_kv_dq=64,
                         block_q_dkv=64, block_kv_dkv=64)

bf16, f16 = jnp.bfloat16, jnp.float16
GRID = [
    Case(batch=1, q_len=128, kv_len=128, dtype=f16),
    # Odd lengths: padded rows, a masked tail of keys (not causal).
    Case(batch=1, q_len=100, kv_len=100, heads=2, kv_heads=1, causal=True, dtype=f16),
    Case(batch=1, q_len=100, kv_len=100, masks="padding", dtype=bf16),
    # Two CTAs of rows, three K/V tiles through a two-slot ring, GQA 2:1.
    Case(batch=1, q_len=150, kv_len=150, heads=4, kv_heads=2, causal=True,
         masks="segments", dtype=f16),
    # Cross-attention both ways round; bottom-right causal: in the second the
    # first 183 rows see no key (zeros, zero gradients).
    Case(batch=1, q_len=17, kv_len=200, causal=True, dtype=bf16),
    Case(batch=1, q_len=200, kv_len=17, heads=1, kv_heads=1, causal=True, dtype=f16),
    # Head dims padded to the 64-wide swizzle (80 -> 128); MQA.
    Case(batch=1, q_len=64, kv_len=64, heads=3, kv_heads=1, head_dim=128,
         masks="both", dtype=f16),
    Case(batch=2, q_len=70, kv_len=70, heads=1, kv_heads=1, head_dim=80,
         causal=True, masks="padding", dtype=bf16),
]

needs_interpreter = pytest.mark.skipif(
    not mosaic_interpret.SUPPORTED, reason=mosaic_interpret.REASON)
MODES = [
    pytest.param("interpret", id="interpret", marks=needs_interpreter),
    pytest.param("compiled", id="sm90", marks=pytest.mark.gpu),
]


def _interpreter(mode: str):
  """The shim around an interpreted run; nothing around a compiled one."""
  if mode == "interpret":
    return mosaic_interpret.mosaic_interpreter(force=False)
  return contextlib.nullcontext()


def _run(case: Case, mode: str):
  q, k, v, cotangent, masks = make_inputs(case, seed=zlib.crc32(case.id.encode()))
  interpret = mosaic_interpret.PARAMS if mode == "interpret" else False
  with _interpreter(mode):
    out, grads = output_and_grads(
        mosaic_attention, q, k, v, cotangent, causal=case.causal,
        block_sizes=SMALL, interpret=interpret, **masks)
  ref_out, ref_grads = reference_output_and_grads(case, q, k, v, cotangent, masks)
  return out, grads, ref_out, ref_grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_values_and_gradients_match_reference(case, mode):
  out, grads, ref_out, ref_grads = _run(case, mode)
  out_tol, grad_tol = TOLERANCE[case.dtype]
  assert out.shape == ref_out.shape
  assert_close(out, ref_out, out_tol, "output")
  for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert grad.shape == ref.shape
    assert_close(grad, ref, grad_tol, name)


# The tuning plan's schedules (MosaicBlockSizes fields, off by default):
# ping-pong backward consumers, and a persistent forward grid of 3 CTAs
# looping over 2 x 4 blocks of rows, longest first, its rings carried on
# from block to block (3 and 2 key tiles a block through a 2-slot ring).
SCHEDULES = {
    "bwd_pingpong": dataclasses.replace(SMALL, bwd_pingpong=1),
    "persistent": dataclasses.replace(SMALL, persistent=3),
    # Step M5: dQ added up by the dK/dV kernel (TMA reduce-add), no dQ kernel.
    "dq_atomic": dataclasses.replace(SMALL, dq_atomic=1),
    # Step M8: S of one key tile and PV of the one before in one pipeline;
    # also in the persistent grid, whose blocks carry the ring on.
    "fwd_overlap": dataclasses.replace(SMALL, fwd_overlap=1),
    "fwd_overlap_persistent": dataclasses.replace(SMALL, fwd_overlap=1, persistent=3),
}
SCHEDULE_CASES = [
    Case(batch=1, q_len=150, kv_len=150, heads=4, kv_heads=2, causal=True,
         masks="segments", dtype=f16),
    Case(batch=2, q_len=100, kv_len=170, heads=2, kv_heads=1, masks="padding",
         dtype=bf16),
    # The first 183 rows see no key: their dQ must stay zero.
    Case(batch=1, q_len=200, kv_len=17, heads=1, kv_heads=1, causal=True, dtype=f16),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=lambda c: c.id)
def test_schedules_match_reference(case, schedule, mode):
  _check_blocks(case, SCHEDULES[schedule], mode, seed=zlib.crc32(case.id.encode()))


def _check_blocks(case: Case, blocks: MosaicBlockSizes, mode: str, seed: int):
  """Values and gradients of `case` with `blocks` against the float32 reference."""
  q, k, v, cotangent, masks = make_inputs(case, seed=seed)
  interpret = mosaic_interpret.PARAMS if mode == "interpret" else False
  with _interpreter(mode):
    out, grads = output_and_grads(
        mosaic_attention, q, k, v, cotangent, causal=case.causal,
        block_sizes=blocks, interpret=interpret, **masks)
  ref_out, ref_grads = reference_output_and_grads(case, q, k, v, cotangent, masks)
  out_tol, grad_tol = TOLERANCE[case.dtype]
  assert_close(out, ref_out, out_tol, "output")
  for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert_close(grad, ref, grad_tol, name)


# Step M5 past head dim 64: the two dK/dV consumers split dQ's columns, each
# multiplying both consumers' dS (read from shared memory after a barrier,
# double-buffered) by its half of K. Two CTAs of keys, GQA sums over 3 query
# tiles of 2 heads (6 steps: both dS buffers are reused); padded keys and
# head dims (80 -> 128).
SPLIT_CASES = [
    Case(batch=1, q_len=150, kv_len=150, heads=4, kv_heads=2, head_dim=128,
         masks="segments", dtype=f16),
    Case(batch=2, q_len=100, kv_len=170, heads=2, kv_heads=1, head_dim=80,
         masks="padding", dtype=bf16),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.id)
def test_dq_atomic_split_share_matches_reference(case, mode):
  _check_blocks(case, SCHEDULES["dq_atomic"], mode, seed=zlib.crc32(case.id.encode()))


@pytest.mark.parametrize("head_dim, causal, dq_kernel_runs", [
    (64, True, False),
    (128, False, False),
    # The split share with a diagonal mask spilled: the dQ kernel runs.
    (128, True, True),
])
@needs_interpreter
def test_dq_atomic_replaces_the_dq_kernel_where_it_applies(head_dim, causal,
                                                          dq_kernel_runs, monkeypatch):
  from fusedlm.kernels.mosaic import attention as mosaic_module
  calls = []
  stock = mosaic_module.backward_dq

  def counted(*args, **kwargs):
    calls.append(None)
    return stock(*args, **kwargs)

  monkeypatch.setattr(mosaic_module, "backward_dq", counted)
  case = Case(batch=1, q_len=100, kv_len=100, heads=2, kv_heads=1,
              head_dim=head_dim, causal=causal, dtype=f16)
  _check_blocks(case, SCHEDULES["dq_atomic"], "interpret", seed=head_dim)
  assert bool(calls) == dq_kernel_runs


@needs_interpreter
def test_dq_atomic_under_vmap_matches_the_dq_kernel():
  # jax.vmap over a leading axis batches the dK/dV kernel and its jax.new_ref
  # accumulator (the kernel's vmap rule indexes each Ref by the batch).
  q, k, v = (jax.random.normal(key, (3, 1, 100, 2, 64), f16)
             for key in jax.random.split(jax.random.key(5), 3))

  def grads(blocks):
    def loss(q, k, v):
      out = jax.vmap(lambda q, k, v: mosaic_attention(
          q, k, v, causal=True, block_sizes=blocks,
          interpret=mosaic_interpret.PARAMS))(q, k, v)
      return jnp.sum(out.astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  with _interpreter("interpret"):
    ours, theirs = grads(SCHEDULES["dq_atomic"]), grads(SMALL)
  _, grad_tol = TOLERANCE[f16]
  for name, grad, ref in zip(("dq", "dk", "dv"), ours, theirs):
    assert_close(np.asarray(grad, np.float32), np.asarray(ref, np.float32), grad_tol, name)


@pytest.mark.parametrize("mode", MODES)
def test_rows_that_see_no_key_are_zero_with_zero_gradients(mode):
  # Every key of batch row 1 is padded away.
  case = Case(batch=2, q_len=64, kv_len=64, heads=1, kv_heads=1, dtype=f16)
  q, k, v, cotangent, _ = make_inputs(case, seed=3)
  padding = jnp.stack([jnp.ones(64, bool), jnp.zeros(64, bool)])
  interpret = mosaic_interpret.PARAMS if mode == "interpret" else False
  with _interpreter(mode):
    out, (dq, dk, dv) = output_and_grads(
        mosaic_attention, q, k, v, cotangent, key_padding_mask=padding,
        block_sizes=SMALL, interpret=interpret)
  for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
    assert np.all(np.isfinite(x)), name
    np.testing.assert_array_equal(x[1], 0.0, err_msg=name)
  assert np.abs(out[0]).max() > 0.0


@needs_interpreter
def test_entry_point_dispatches_to_mosaic():
  case = Case(batch=1, q_len=64, kv_len=64, heads=1, kv_heads=1, causal=True,
              dtype=f16)
  q, k, v, _, _ = make_inputs(case, seed=5)
  with mosaic_interpret.mosaic_interpreter(force=False):
    out = dot_product_attention(q, k, v, causal=True, implementation="mosaic",
                                block_sizes=SMALL,
                                interpret=mosaic_interpret.PARAMS)
  ref = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                              v.astype(jnp.float32), causal=True,
                              implementation="xla")
  assert_close(np.asarray(out, np.float32), np.asarray(ref), TOLERANCE[f16][0],
               "output")


# Argument checks: every JAX, no interpreter run.

def _qkv(dtype=f16, head_dim=64):
  x = jnp.zeros((1, 8, 2, head_dim), dtype)
  return x, x, x


def test_refuses_float32():
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    mosaic_attention(*_qkv(jnp.float32), interpret=True)


def test_refuses_head_dims_over_256():
  with pytest.raises(ValueError, match="head dims up to 256, got 512"):
    mosaic_attention(*_qkv(head_dim=512), interpret=True)


@pytest.mark.parametrize("field, value, message", [
    ("block_q", 32, "power of two of at least 64"),
    ("block_kv", 96, "power of two of at least 64"),
    ("block_kv_dq", 512, "at most 256"),
    ("num_stages", 1, "at least 2"),
    ("bwd_pingpong", 2, "0 or 1"),
    ("persistent", -1, "the number of CTAs"),
    ("dq_atomic", 2, "0 or 1"),
])
def test_block_sizes_are_checked(field, value, message):
  with pytest.raises(ValueError, match=f"MosaicBlockSizes.{field}.*{message}"):
    MosaicBlockSizes(**{field: value})


def test_dq_atomic_and_the_backward_ping_pong_do_not_combine():
  with pytest.raises(ValueError, match="dq_atomic and bwd_pingpong"):
    MosaicBlockSizes(dq_atomic=1, bwd_pingpong=1)


def test_shared_memory_over_the_h100s_is_refused():
  too_big = MosaicBlockSizes(block_kv=256, num_stages=3)
  with pytest.raises(ValueError, match="shared memory in the forward kernel"):
    mosaic_attention(*_qkv(head_dim=128), block_sizes=too_big, interpret=True)


def test_block_sizes_of_the_triton_kernel_are_refused():
  from fusedlm.kernels import BlockSizes
  with pytest.raises(ValueError, match="must be a MosaicBlockSizes"):
    mosaic_attention(*_qkv(), block_sizes=BlockSizes(), interpret=True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_compiled_mode_off_gpu_names_the_way_out():
  with pytest.raises(ValueError, match="JAX >= 0.11|interpret=True"):
    mosaic_attention(*_qkv())


def test_variants_it_does_not_take_are_refused():
  q = _qkv()[0]
  mask = jnp.ones((1, 1, q.shape[1], q.shape[1]), bool)
  with pytest.raises(ValueError, match="'mosaic' cannot run this call: mosaic does"
                     " not take mask"):
    dot_product_attention(*_qkv(), mask=mask, implementation="mosaic")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_entry_point_off_gpu_says_where_it_runs():
  with pytest.raises(ValueError, match="'mosaic' runs on Hopper GPUs.*'pallas' or 'xla'"):
    dot_product_attention(*_qkv(), implementation="mosaic")
