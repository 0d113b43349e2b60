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
    consumers take turns, so one's softmax overlaps the other's products.
    With `MosaicBlockSizes.fwd_overlap` each consumer also overlaps its own
    (tuning step M8): the QK^T of one key tile and the PV of the one before
    are issued together, and the softmax waits only for the first;
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
    adds would need a float32 dQ in global memory and its conversion. Past
    head dim 128 the backward consumers share rows (dQ: each holds half the
    head dim) or keys (dK/dV: one holds dK, the other dV and hands it P).

Variants (`kernels.variants`), each a trace-time specialisation that leaves
the plain kernels as they were (`kernels.mosaic.logits`):
  * additive bias: tiles streamed through the rings beside K (forward, dQ)
    or Q (dK/dV, from the transposed bias); d bias is the dQ kernel's dS,
    written tile by tile and summed over the axes the bias broadcasts;
  * local window: a leading and a trailing masked loop around the whole
    tiles, and every tile outside the window skipped (`kernels.mosaic.bounds`);
  * logit soft-cap on the biased logits, its derivative folded into dS;
  * dropout: the Philox bits of `kernels.variants` drawn while a wgmma runs,
    with the hardware's high multiply, packed one bit a pair until used,
    and drawn again in both backward kernels (the mask is never stored);
  * the log-sum-exp as an output, its cotangent entering as D - dlse;
  * a value head dim of its own (each padded on its own), and head dims up
    to 256.

Mosaic GPU needs a head dim that fills whole 128-byte swizzled rows: each is
padded to a multiple of 64 (of 128 past 128; at most 256, see
`tiles.MAX_HEAD_DIM`); the lengths are padded to the tiles and padded keys
are masked. `interpret=` runs the kernels in Pallas' Mosaic GPU interpreter
(JAX >= 0.11) on any machine; the test suite does so.

Modules: this one (the op, its checks and padding), `forward`,
`backward_dq`, `backward_dkv` (the kernels), `logits`, `bounds` and
`tiles` (what they share).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fusedlm.kernels import masking, target, variants
from fusedlm.kernels.mosaic.backward_dkv import backward_dkv
from fusedlm.kernels.mosaic.backward_dq import backward_dq
from fusedlm.kernels.mosaic.forward import forward
from fusedlm.kernels.mosaic.tiles import (
  COMPUTE_WARPGROUPS,
  MAX_HEAD_DIM,
  Dims,
  MosaicBlockSizes,
  MosaicStatic,
  dq_in_dkv,
)
from fusedlm.kernels.tiling import SMEM_BYTES, pad_axis

MIN_JAX = (0, 11)

# --------------------------------------------------------------------------
# The differentiable op and its entry point.


LN2 = math.log(2.0)


def _varying_like(x, *like):
  """x, typed as varying over every manual mesh axis that one of `like` varies over.

  Pallas traces a kernel with JAX's varying-manual-axes check off, so under
  `jax.shard_map` (check_vma) the kernels' outputs carry none of their
  inputs' axes; a custom VJP must return outputs and cotangents typed like
  its arguments. Outside shard_map (jit, pmap) there are no such axes.
  None passes through (an absent bias's cotangent).
  """
  if x is None:
    return None
  axes = set()
  for y in jax.tree.leaves(like):
    axes |= _varying_axes(y)
  missing = tuple(axes - _varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying_axes(x) -> frozenset:
  mat = getattr(jax.typeof(x), "mat", None)  # JAX's ManualAxisType
  return frozenset(getattr(mat, "varying", ()))


def _primal(out, lse, st: MosaicStatic, *inputs):
  """The op's output(s), typed like its inputs (`_varying_like`)."""
  out = _varying_like(out, *inputs)
  return (out, _varying_like(_lse_out(lse), out)) if st.var.return_lse else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, segments, bias, seed, st: MosaicStatic):
  out, lse = forward(q, k, v, segments, bias, seed, st)
  return _primal(out, lse, st, q, k, v, segments, bias, seed)


def _attention_fwd(q, k, v, segments, bias, seed, st: MosaicStatic):
  out, lse = forward(q, k, v, segments, bias, seed, st)
  inputs = (q, k, v, segments, bias, seed)
  out = _varying_like(out, *inputs)
  return _primal(out, lse, st, *inputs), (*inputs, out, _varying_like(lse, out))


def _attention_bwd(st: MosaicStatic, residuals, cotangent):
  q, k, v, segments, bias, seed, out, lse = residuals
  do, dlse = cotangent if st.var.return_lse else (cotangent, None)
  # D = rowsum(dO * O) (FlashAttention-2, Algorithm 2 line 4): O(N d) in XLA.
  delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32),
                     out.astype(jnp.float32))
  if dlse is not None:
    # d lse_i / d x_ij = P_ij, so dS = P (dP - D) + P dlse = P (dP - (D - dlse)).
    delta = delta - dlse
  bias_t = None if bias is None else jnp.swapaxes(bias, 2, 3)
  if dq_in_dkv(st.blocks, st.dims, st.var, st.causal):
    # Tuning step M5: the dK/dV kernel adds each key tile's dS K into a
    # float32 dQ (a Ref the kernel updates in place), in scaled-score units.
    dq_sum = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    dk, dv = backward_dkv(q, k, v, segments, bias_t, seed, do, lse, delta, st,
                          dq_sum=dq_sum)
    dq, dbias = (dq_sum[...] * st.scale).astype(q.dtype), None
  else:
    dq, dbias = backward_dq(q, k, v, segments, bias, seed, do, lse, delta, st)
    dk, dv = backward_dkv(q, k, v, segments, bias_t, seed, do, lse, delta, st)
  if dbias is not None:
    dbias = _bias_gradient(dbias, segments, bias, st)
  return (_varying_like(dq, q), _varying_like(dk, k), _varying_like(dv, v), None,
          _varying_like(dbias, bias), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _lse_out(lse):
  """The kernel's log2-unit L (+inf: no key) as natural log (-inf: no key)."""
  return jnp.where(jnp.isinf(lse), -jnp.inf, lse * LN2)


def _bias_gradient(ds, segments, bias, st: MosaicStatic):
  """d bias from the dQ kernel's dS tiles [b, h, q_pad, kv_pad]: zero where
  no pair is visible (the tiles the kernel skipped are unwritten), summed
  over the axes the bias broadcasts."""
  _, _, q_pad, kv_pad = ds.shape
  rows = jnp.arange(q_pad)[:, None]
  cols = jnp.arange(kv_pad)[None, :]
  visible = None
  def both(mask):
    return mask if visible is None else visible & mask
  window = st.var.window or (None, None)
  for reach, sign in ((0 if st.causal else None, 1), (window[1], 1), (window[0], -1)):
    if reach is not None:
      edge = rows + st.offset + sign * reach
      visible = both(cols <= edge if sign > 0 else cols >= edge)
  visible = None if visible is None else visible[None, None]
  if segments is not None:
    q_segments, kv_segments = segments
    visible = both(q_segments[:, None, :, None] == kv_segments[:, None, None, :])
  if visible is not None:
    ds = jnp.where(visible, ds, 0.0)
  per_batch, per_head = st.var.bias
  axes = tuple(a for a, keep in ((0, per_batch), (1, per_head)) if not keep)
  ds = jnp.sum(ds, axis=axes, keepdims=True) if axes else ds
  return ds.astype(bias.dtype)


def _plan(shape: masking.AttentionShape, dtype, bias_dtype, var: variants.Variants,
          block_sizes):
  """(Dims, MosaicBlockSizes) of a call, or the ValueError that says why the
  kernel cannot take it."""
  if dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"implementation='mosaic' takes bfloat16 or float16 (wgmma's 16-bit"
        f" inputs), got {dtype}; use 'pallas' or 'xla' for float32.")
  if max(shape.head_dim, shape.v_head_dim) > MAX_HEAD_DIM:
    raise ValueError(
        f"implementation='mosaic' takes head dims up to {MAX_HEAD_DIM}, got"
        f" {max(shape.head_dim, shape.v_head_dim)}.")
  dims = Dims.padded(shape.head_dim, shape.v_head_dim, jnp.dtype(dtype).itemsize,
                     0 if bias_dtype is None else jnp.dtype(bias_dtype).itemsize,
                     dkv_roles=_dkv_roles(shape, var))
  if block_sizes is None:
    block_sizes = MosaicBlockSizes.get_default(dims)
  elif not isinstance(block_sizes, MosaicBlockSizes):
    raise ValueError(
        f"block_sizes must be a MosaicBlockSizes, got {block_sizes!r}.")
  for kernel, used in block_sizes.smem_bytes(dims).items():
    if used > SMEM_BYTES:
      raise ValueError(
          f"{block_sizes} needs {used} bytes of shared memory in the {kernel}"
          f" kernel at head dims {dims.d}/{dims.dv}"
          f"{' with a bias' if bias_dtype is not None else ''}, over the H100's"
          f" {SMEM_BYTES}; use smaller tiles or fewer stages, or"
          " implementation='pallas'.")
  return dims, block_sizes


def _dkv_roles(shape: masking.AttentionShape, var: variants.Variants) -> bool:
  """Whether the dK/dV kernel's consumers split dK and dV below 128 too.

  At head dim 128 a consumer holding dK and dV (128 registers a thread) has
  room for the plain tiles but not for the soft-cap's derivative or
  dropout's mask beside them: those spilled (8 to 250 bytes). With one
  consumer per accumulator (`backward_dkv`), the same products for half the
  keys per CTA.
  """
  return (max(shape.head_dim, shape.v_head_dim) > 64
          and (var.soft_cap is not None or var.dropout_rate > 0.0))


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
    jax.jit,
    static_argnames=("causal", "scale", "block_sizes", "interpret",
                     "causal_alignment", "local_window_size", "logits_soft_cap",
                     "dropout_rate", "return_lse"))
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
    bias=None,  # [batch|1, num_heads|1, q_len|1, kv_len|1] float
    causal_alignment: str = "bottom_right",
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,  # a jax.random key; needed when dropout_rate > 0
    return_lse: bool = False,
    block_sizes: MosaicBlockSizes | None = None,
    interpret: Any = False,
):  # -> [batch, q_len, num_heads, v_head_dim], q.dtype; with return_lse also
    # lse [batch, num_heads, q_len] float32
  """Fused attention on Hopper through Mosaic GPU, differentiable in q, k, v, bias.

  Mask semantics are those of `kernels.masking`, the variants' those of
  `kernels.variants` (every one but the per-head `mask`). bfloat16 or
  float16; head dims up to 256 (padded to multiples of 64, or of 128 past
  128). `interpret=True` (or an `InterpretGPUParams`) runs the kernels in
  Pallas' Mosaic GPU interpreter on any backend (JAX >= 0.11); otherwise
  they compile for sm_90a and need a compute-capability-9.x GPU.
  """
  if interpret is False or interpret is None:
    check_device()
  return mosaic_attention_any_device(
      q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, bias=bias,
      causal_alignment=causal_alignment, local_window_size=local_window_size,
      logits_soft_cap=logits_soft_cap, dropout_rate=dropout_rate,
      dropout_rng=dropout_rng, return_lse=return_lse, block_sizes=block_sizes,
      interpret=interpret)


def mosaic_attention_any_device(q, k, v, *, causal=False, scale=None,
                                key_padding_mask=None, segment_ids=None,
                                kv_segment_ids=None, bias=None,
                                causal_alignment="bottom_right",
                                local_window_size=None, logits_soft_cap=None,
                                dropout_rate=0.0, dropout_rng=None,
                                return_lse=False, block_sizes=None,
                                interpret=False):
  """`mosaic_attention` without its device check, unjitted.

  For compiling the kernels for an H100 on a machine without one
  (`kernels.bench.mosaic_compile`); callers should use `mosaic_attention`.
  """
  shape = masking.check_qkv(q, k, v)
  bias, bias_layout = variants.check_broadcast("bias", bias, shape, boolean=False)
  var = variants.Variants(
      window=variants.check_window(local_window_size),
      soft_cap=variants.check_soft_cap(logits_soft_cap),
      dropout_rate=variants.check_dropout(dropout_rate, dropout_rng),
      bias=bias_layout, return_lse=bool(return_lse))
  offset = variants.alignment_offset(shape, causal_alignment)
  dims, block_sizes = _plan(shape, q.dtype, None if bias is None else bias.dtype,
                            var, block_sizes)
  segments = masking.segments_from_masks(
      shape, key_padding_mask, segment_ids, kv_segment_ids)
  st = MosaicStatic(
      scale=masking.default_scale(shape.head_dim, scale),
      causal=bool(causal), q_len=shape.q_len, kv_len=shape.kv_len,
      group=shape.group_size, has_segments=segments is not None,
      blocks=block_sizes, interpret=_interpret_params(interpret),
      offset=offset, dims=dims, var=var)
  bs, wgs = block_sizes, COMPUTE_WARPGROUPS
  # Blocks of rows (keys) a backward CTA owns: see backward_dq / backward_dkv.
  row_sets = wgs if dims.parts == 1 else 1
  key_sets = 1 if dims.dkv_roles else wgs
  # Powers of two: the largest tile of each side is a multiple of the others.
  q_tile = max(wgs * bs.block_q, row_sets * bs.block_q_dq, bs.block_q_dkv)
  kv_tile = max(bs.block_kv, bs.block_kv_dq, key_sets * bs.block_kv_dkv)
  q_pad = pl.cdiv(shape.q_len, q_tile) * q_tile
  kv_pad = pl.cdiv(shape.kv_len, kv_tile) * kv_tile
  qp = pad_axis(pad_axis(q, 3, dims.d), 1, q_pad)
  kp = pad_axis(pad_axis(k, 3, dims.d), 1, kv_pad)
  vp = pad_axis(pad_axis(v, 3, dims.dv), 1, kv_pad)
  if segments is not None:
    q_segments, kv_segments = segments
    segments = (pad_axis(q_segments, 1, q_pad),
                pad_axis(kv_segments, 1, kv_pad, value=masking.PAD_SEGMENT))
  if bias is not None:
    bias = pad_axis(pad_axis(bias, 2, q_pad), 3, kv_pad)
  seed = None if var.dropout_rate == 0.0 else variants.seed_words(dropout_rng)
  result = _attention(qp, kp, vp, segments, bias, seed, st)
  out, lse = result if var.return_lse else (result, None)
  out = out[:, : shape.q_len, :, : shape.v_head_dim]
  return out if lse is None else (out, lse[:, :, : shape.q_len])
