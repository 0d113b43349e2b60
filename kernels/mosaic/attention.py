"""Fused softmax attention for Hopper GPUs (sm_90a) in Pallas' Mosaic GPU backend.

The same contract as `kernels.triton.attention` (layout [batch, len, heads,
head_dim], bottom-right causal alignment, key padding and segment ids from
`kernels.masking`, grouped-query heads without repeating K/V, any lengths,
rows that see no key give zeros and zero gradients), for bfloat16 and
float16, written for what Hopper has and Triton does not let us steer
(FlashAttention-3, Shah et al. 2024):

  * warp specialisation: each CTA runs three warpgroups. One (the producer,
    24 registers a thread) only issues TMA bulk copies of the streamed tiles
    into a `num_stages`-deep shared-memory ring; two consumers (240
    registers) each own a block of rows and do the matrix products with
    asynchronous `wgmma` and the softmax in registers;
  * the ring is synchronised by mbarriers only: `loaded[slot]` completes
    when the slot's TMA bytes have landed (the producer arms it with the
    copy), `consumed[slot]` when both consumers have arrived on it, and the
    producer waits on `consumed[slot]` before it overwrites the slot. A
    consumer arrives only after the wgmma that reads the slot has been waited
    on (reading a wgmma accumulator waits for it), so a slot is never
    refilled under a running product. This is deliberately conservative:
    Pallas' interpreter runs wgmma synchronously and cannot catch an early
    release, so the order must be right by construction;
  * ping-pong (forward): a two-arrival `schedule` barrier makes the two
    consumers take turns, so one's softmax overlaps the other's products;
  * scores stay in log2 units with scale * log2(e) folded into one multiply,
    so each exponential is one `exp2` (the row maximum is taken on the raw
    products and scaled once per row);
  * masked blocks are skipped by loop bounds (the causal diagonal and the
    padded tail), and only the blocks that straddle a mask edge pay for
    `where`; with segment ids every block is masked;
  * backward (FlashAttention-2's Algorithm 2 on the same machinery): a dK/dV
    kernel whose consumers each own a block of keys and keep dK and dV in
    registers while the producer streams Q, dO, L and D blocks of every query
    head of the group (GQA sums in the kernel, K/V are never repeated), and a
    separate dQ kernel, streaming K and V like the forward. The separate pass
    costs a second S = QK^T and dP per tile but writes dQ once, where atomic
    adds would need a float32 dQ in global memory and its conversion.

Mosaic GPU needs a head dim that fills whole 128-byte swizzled rows: it is
padded to a multiple of 64 (at most 128, see `mosaic_tiles.MAX_HEAD_DIM`);
the lengths are padded to the tiles and padded keys are masked. `interpret=` runs the kernels in Pallas'
Mosaic GPU interpreter (JAX >= 0.11) on any machine; the test suite does so.

Modules: this one (the op, its checks and padding), `kernels.mosaic.forward`,
`kernels.mosaic.backward` (the kernels), `kernels.mosaic.tiles` (what they
share: block sizes, static settings, masks, loop bounds).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fusedlm.kernels import masking, target
from fusedlm.kernels.mosaic.backward import backward_dkv, backward_dq
from fusedlm.kernels.mosaic.forward import forward
from fusedlm.kernels.mosaic.tiles import (
  COMPUTE_WARPGROUPS,
  HEAD_DIM_QUANTUM,
  MAX_HEAD_DIM,
  MosaicBlockSizes,
  MosaicStatic,
)
from fusedlm.kernels.tiling import SMEM_BYTES, pad_axis

MIN_JAX = (0, 11)

# --------------------------------------------------------------------------
# The differentiable op and its entry point.


def _varying_like(x, *like):
  """x, typed as varying over every manual mesh axis that one of `like` varies over.

  Pallas traces a kernel with JAX's varying-manual-axes check off, so under
  `jax.shard_map` (check_vma) the kernels' outputs carry none of their
  inputs' axes; a custom VJP must return outputs and cotangents typed like
  its arguments. Outside shard_map (jit, pmap) there are no such axes.
  """
  axes = set()
  for y in jax.tree.leaves(like):
    axes |= _varying_axes(y)
  missing = tuple(axes - _varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying_axes(x) -> frozenset:
  mat = getattr(jax.typeof(x), "mat", None)  # JAX's ManualAxisType
  return frozenset(getattr(mat, "varying", ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segments, st: MosaicStatic):
  return _varying_like(forward(q, k, v, segments, st)[0], q, k, v, segments)


def _attention_fwd(q, k, v, segments, st: MosaicStatic):
  out, lse = forward(q, k, v, segments, st)
  out = _varying_like(out, q, k, v, segments)
  return out, (q, k, v, segments, out, _varying_like(lse, out))


def _attention_bwd(st: MosaicStatic, residuals, do):
  q, k, v, segments, out, lse = residuals
  # D = rowsum(dO * O) (FlashAttention-2, Algorithm 2 line 4): O(N d) in XLA.
  delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32),
                     out.astype(jnp.float32))
  dq = backward_dq(q, k, v, segments, do, lse, delta, st)
  dk, dv = backward_dkv(q, k, v, segments, do, lse, delta, st)
  return (_varying_like(dq, q), _varying_like(dk, k), _varying_like(dv, v),
          None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _interpret_params(interpret):
  """False, or the Mosaic GPU interpreter's parameters for `interpret`."""
  if interpret is False or interpret is None:
    return False
  if jax.__version_info__ < MIN_JAX:
    raise ValueError(
        "the Mosaic GPU interpreter needs JAX >= 0.11 (the one in"
        f" {jax.__version__} cannot run wgmma with transposed operands); use"
        " implementation='pallas' with interpret=True on this JAX.")
  if interpret is True:
    return plgpu.InterpretGPUParams()
  if not isinstance(interpret, plgpu.InterpretGPUParams):
    raise ValueError(
        "interpret must be a bool or a jax.experimental.pallas.mosaic_gpu."
        f"InterpretGPUParams, got {interpret!r}.")
  return interpret


def check_device():
  """ValueError unless the compiled kernels can run here: JAX >= 0.11 and a
  GPU of compute capability 9.x (`kernels.target.current_device()`)."""
  device = target.current_device()
  way_out = ("use implementation='auto', 'pallas' or 'xla' (or interpret=True:"
             " Mosaic GPU's interpreter, JAX >= 0.11)")
  if not target.is_gpu(device):
    raise ValueError(
        "implementation='mosaic' runs on Hopper GPUs (sm_90a); this is a"
        f" {target.describe(device)}: {way_out}.")
  if not target.is_hopper(device):
    raise ValueError(
        "implementation='mosaic' uses Hopper's wgmma and TMA (compute"
        f" capability 9.x); this is a {target.describe(device)}: use"
        " implementation='auto' or 'pallas'.")
  if jax.__version_info__ < MIN_JAX:
    raise ValueError(
        f"implementation='mosaic' needs JAX >= 0.11, this is {jax.__version__}.")


@functools.partial(
    jax.jit, static_argnames=("causal", "scale", "block_sizes", "interpret"))
def mosaic_attention(
    q,  # [batch, q_len, num_heads, head_dim]
    k,  # [batch, kv_len, num_kv_heads, head_dim]
    v,  # [batch, kv_len, num_kv_heads, v_head_dim]
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask=None,  # [batch, kv_len] bool, True = attend
    segment_ids=None,  # [batch, q_len] int
    kv_segment_ids=None,  # [batch, kv_len] int; defaults to segment_ids
    block_sizes: MosaicBlockSizes | None = None,
    interpret: Any = False,
):  # -> [batch, q_len, num_heads, v_head_dim], q.dtype
  """Fused attention on Hopper through Mosaic GPU, differentiable in q, k, v.

  Mask semantics are those of `kernels.masking`. bfloat16 or float16; head
  dims up to 128 (padded to 64 or 128). `interpret=True` (or an
  `InterpretGPUParams`) runs the kernels in Pallas' Mosaic GPU interpreter on
  any backend (JAX >= 0.11); otherwise they compile for sm_90a and need a
  compute-capability-9.x GPU.
  """
  if interpret is False or interpret is None:
    check_device()
  return mosaic_attention_any_device(
      q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
      block_sizes=block_sizes, interpret=interpret)


def mosaic_attention_any_device(q, k, v, *, causal=False, scale=None,
                          key_padding_mask=None, segment_ids=None,
                          kv_segment_ids=None, block_sizes=None,
                          interpret=False):
  """`mosaic_attention` without its device check, unjitted.

  For compiling the kernels for an H100 on a machine without one
  (`kernels.bench.mosaic_compile`); callers should use `mosaic_attention`.
  """
  shape = masking.check_qkv(q, k, v)
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"implementation='mosaic' takes bfloat16 or float16 (wgmma's 16-bit"
        f" inputs), got {q.dtype}; use 'pallas' or 'xla' for float32.")
  d = max(shape.head_dim, shape.v_head_dim)
  if d > MAX_HEAD_DIM:
    raise ValueError(
        f"implementation='mosaic' takes head dims up to {MAX_HEAD_DIM}, got"
        f" {d}.")
  d_pad = pl.cdiv(d, HEAD_DIM_QUANTUM) * HEAD_DIM_QUANTUM
  if block_sizes is None:
    block_sizes = MosaicBlockSizes.get_default(d_pad)
  elif not isinstance(block_sizes, MosaicBlockSizes):
    raise ValueError(
        f"block_sizes must be a MosaicBlockSizes, got {block_sizes!r}.")
  for kernel, used in block_sizes.smem_bytes(d_pad, q.dtype.itemsize).items():
    if used > SMEM_BYTES:
      raise ValueError(
          f"{block_sizes} needs {used} bytes of shared memory in the {kernel}"
          f" kernel at head dim {d_pad}, over the H100's {SMEM_BYTES}; use"
          " smaller tiles or fewer stages.")
  segments = masking.segments_from_masks(
      shape, key_padding_mask, segment_ids, kv_segment_ids)
  params = _interpret_params(interpret)
  st = MosaicStatic(
      scale=masking.default_scale(shape.head_dim, scale),
      causal=bool(causal), q_len=shape.q_len, kv_len=shape.kv_len,
      group=shape.group_size, has_segments=segments is not None,
      blocks=block_sizes, interpret=params)
  bs = block_sizes
  # Powers of two: the largest tile of each side is a multiple of the others.
  q_tile = max(COMPUTE_WARPGROUPS * bs.block_q,
               COMPUTE_WARPGROUPS * bs.block_q_dq, bs.block_q_dkv)
  kv_tile = max(bs.block_kv, bs.block_kv_dq, COMPUTE_WARPGROUPS * bs.block_kv_dkv)
  q_pad = pl.cdiv(shape.q_len, q_tile) * q_tile
  kv_pad = pl.cdiv(shape.kv_len, kv_tile) * kv_tile
  qp = pad_axis(pad_axis(q, 3, d_pad), 1, q_pad)
  kp = pad_axis(pad_axis(k, 3, d_pad), 1, kv_pad)
  vp = pad_axis(pad_axis(v, 3, d_pad), 1, kv_pad)
  if segments is not None:
    q_segments, kv_segments = segments
    segments = (pad_axis(q_segments, 1, q_pad),
                pad_axis(kv_segments, 1, kv_pad, value=masking.PAD_SEGMENT))
  out = _attention(qp, kp, vp, segments, st)
  return out[:, : shape.q_len, :, : shape.v_head_dim]
