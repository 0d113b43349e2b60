"""Fused softmax attention for TPUs in Pallas' Mosaic TPU backend: forward and backward.

The same contract as `kernels.triton.attention` (layout [batch, len, heads,
head_dim]; the masks of `kernels.masking`: causal aligned bottom-right or
top-left, key padding, segment ids; the variants of `kernels.variants`:
bias with its gradient, per-head mask, local window, soft-cap, dropout,
log-sum-exp output; grouped-query heads without repeating K/V; any lengths;
rows that see no key give zeros and zero gradients), written for what a TPU
core has:

  * the wrapper moves heads before the sequence ([batch, heads, len, dim],
    one XLA transpose each way), so a block is a [rows, head_dim] slab whose
    last two dims tile VMEM; head dims stay unpadded (64, 128, 256: the
    block's last dim is the array's);
  * score tiles [block_q, block_k] with block_k a multiple of 128 lanes and
    both sides of each product at least 128 by default, for the 128 x 128
    MXU; softmax statistics, accumulators and dK/dV in float32 VMEM scratch
    that lives across the sequential innermost grid axis
    (`kernels.tpu.forward`, `kernels.tpu.backward`);
  * block skipping through scalar-prefetched [first, end) ranges and
    clamped index maps (`kernels.tpu.tiles`): causal, window and segment
    blocks that no pair can see cost neither a copy nor a product; only
    tiles that straddle a mask edge evaluate the mask;
  * natural-log softmax (the TPU's exp), the row log-sum-exp kept per row as
    the backward's residual; D = rowsum(dO O) in XLA.

Lengths are padded to the tiles (padded keys masked, padded rows sliced
away). `interpret=True` runs the kernels in Pallas' TPU interpreter on any
backend (how the tests check them on CPU); otherwise they compile for a TPU
(`kernels.bench.tpu_compile` does so without one).

Modules: this one (the op, its checks and padding), `forward`, `backward`
(the kernels), `launch` (how they are launched), `tiles` (static settings,
block ranges, masks) and `block_sizes` (the tuning knob).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fusedlm.kernels import masking, variants
from fusedlm.kernels.tiling import pad_axis
from fusedlm.kernels.tpu import tiles
from fusedlm.kernels.tpu.backward import backward_dkv, backward_dq
from fusedlm.kernels.tpu.block_sizes import (
  DEFAULT_SCOPED_VMEM,
  ROW_LANES,
  SUBLANES,
  TpuBlockSizes,
  clamp,
  floors,
  vmem_bytes,
)
from fusedlm.kernels.tpu.forward import forward
from fusedlm.kernels.tpu.tiles import TpuStatic


_TARGET_TPU = contextvars.ContextVar("fusedlm_target_tpu", default=False)


@contextlib.contextmanager
def targeting_tpu():
  """Within it, "tpu" attention compiles its kernels for a TPU whatever the
  default backend: for lowering a model for a TPU topology on a machine
  without one (`kernels.bench.tpu_compile`, the deviceless tests)."""
  token = _TARGET_TPU.set(True)
  try:
    yield
  finally:
    _TARGET_TPU.reset(token)


def compiles_for_tpu() -> bool:
  """Whether kernels traced now are for a TPU (the backend, or `targeting_tpu`)."""
  return _TARGET_TPU.get() or jax.default_backend() == "tpu"


class _Aux:
  """The call's non-q/k/v arrays (a pytree: residuals of the VJP).

  q_ids [b, q_pad, ROW_LANES], kv_ids [b, SUBLANES, kv_pad] int32 (segments);
  the block ranges of each kernel (flat int32, `tiles`); bias [b|1, h|1,
  q_pad, kv_pad] (its input dtype); mask, same shape, int8; seed [2] int32.
  """

  FIELDS = ("q_ids", "kv_ids", "kv_ranges_fwd", "kv_ranges_dq", "q_ranges_dkv",
            "bias", "mask", "seed")

  def __init__(self, *values):
    for name, value in zip(self.FIELDS, values):
      setattr(self, name, value)

  def replace(self, **changes):
    return _Aux(*(changes.get(n, getattr(self, n)) for n in self.FIELDS))


jax.tree_util.register_pytree_node(
    _Aux, lambda a: (tuple(getattr(a, n) for n in _Aux.FIELDS), None),
    lambda _, values: _Aux(*values))


def _lse_out(lse):
  """The kernels' L [b, h, q_pad, ROW_LANES] (+inf: no key) as [b, h, q_pad]
  (-inf: no key)."""
  lse = lse[..., 0]
  return jnp.where(lse == jnp.inf, -jnp.inf, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, aux, st: TpuStatic):
  out, lse = forward(q, k, v, aux, st)
  return (out, _lse_out(lse)) if st.var.return_lse else out


def _attention_fwd(q, k, v, aux, st: TpuStatic):
  out, lse = forward(q, k, v, aux, st)
  primal = (out, _lse_out(lse)) if st.var.return_lse else out
  return primal, (q, k, v, aux, out, lse)


def _attention_bwd(st: TpuStatic, residuals, cotangent):
  q, k, v, aux, out, lse = residuals
  do, dlse = cotangent if st.var.return_lse else (cotangent, None)
  # D = rowsum(dO * O), FlashAttention-2 Algorithm 2 line 4.
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  if dlse is not None:
    # d lse_i / d x_ij = P_ij, so dS = P (dP - D) + P dlse = P (dP - (D - dlse)).
    delta = delta - dlse
  delta = jnp.broadcast_to(delta[..., None], delta.shape + (ROW_LANES,))
  do = do.astype(q.dtype)
  dq, dbias = backward_dq(q, k, v, do, lse, delta, aux, st)
  dk, dv = backward_dkv(q, k, v, do, lse, delta, aux, st)
  if dbias is not None:
    per_batch, per_head = st.var.bias
    axes = tuple(a for a, keep in ((0, per_batch), (1, per_head)) if not keep)
    dbias = (jnp.sum(dbias, axis=axes, keepdims=True) if axes else dbias)
    dbias = dbias.astype(aux.bias.dtype)
  zeros = jax.tree.map(lambda _: None, aux)
  return dq, dk, dv, zeros.replace(bias=dbias)


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(
    jax.jit,
    static_argnames=("causal", "scale", "block_sizes", "interpret",
                     "causal_alignment", "local_window_size", "logits_soft_cap",
                     "dropout_rate", "return_lse"),
)
def tpu_attention(
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
    mask=None,  # [batch|1, num_heads|1, q_len|1, kv_len|1] bool, True = attend
    causal_alignment: str = "bottom_right",
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,  # a jax.random key; needed when dropout_rate > 0
    return_lse: bool = False,
    block_sizes: TpuBlockSizes | None = None,
    interpret: bool = False,
):  # out [batch, q_len, num_heads, v_head_dim], q.dtype; with return_lse
    # also lse [batch, num_heads, q_len] float32
  """Fused attention on a TPU through Mosaic, differentiable in q, k, v, bias.

  Mask semantics are those of `kernels.masking`, the variants' those of
  `kernels.variants`. `interpret=True` runs the kernels in Pallas' TPU
  interpreter on any backend; otherwise they compile for a TPU.
  """
  if not interpret and not compiles_for_tpu():
    raise ValueError(
        "implementation='tpu' compiles for TPUs; on the"
        f" {jax.default_backend()!r} backend pass interpret=True or use"
        " implementation='xla'.")
  return tpu_attention_any_device(
      q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, bias=bias,
      mask=mask, causal_alignment=causal_alignment,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_lse=return_lse,
      block_sizes=block_sizes, interpret=interpret)


def kernel_tiles(blocks: TpuBlockSizes, shape: masking.AttentionShape, interpret: bool):
  """The clamped (block_q, block_k) of the forward, dQ and dK/dV kernels."""
  q_floor, k_floor = floors(interpret)
  return tuple(
      (clamp(bq, shape.q_len, q_floor), clamp(bk, shape.kv_len, k_floor))
      for bq, bk in zip(blocks.query_blocks(), blocks.key_blocks()))


def _check_vmem(tiles_, shape: masking.AttentionShape, itemsize: int,
                blocks: TpuBlockSizes):
  """Refuses tiles whose estimated VMEM passes the scoped limit, before Mosaic
  would (with a longer message) at compile time."""
  limit = blocks.vmem_limit_bytes or DEFAULT_SCOPED_VMEM
  for kernel, (bq, bk) in zip(("forward", "dq", "dkv"), tiles_):
    need = vmem_bytes(bq, bk, shape.head_dim, shape.v_head_dim, itemsize, kernel)
    if need > limit:
      raise ValueError(
          f"TPU tiles ({bq}, {bk}) of the {kernel} kernel need about {need}"
          f" bytes of VMEM at head dims ({shape.head_dim}, {shape.v_head_dim}),"
          f" over the {limit} scoped limit; use smaller TpuBlockSizes (or raise"
          " their vmem_limit_bytes on a chip with more VMEM).")


def tpu_attention_any_device(q, k, v, *, return_lse=False, **kwargs):
  """`tpu_attention` without its backend check, unjitted.

  For compiling the kernels for a TPU topology on a machine without one
  (`kernels.bench.tpu_compile`); callers should use `tpu_attention`.
  """
  qp, kp, vp, aux, st = prepare(q, k, v, return_lse=return_lse, **kwargs)
  if not st.interpret:
    _check_vmem(st.tiles, masking.check_qkv(q, k, v), q.dtype.itemsize, st.blocks)
  result = _attention(qp, kp, vp, aux, st)
  out, lse = result if st.var.return_lse else (result, None)
  out = jnp.swapaxes(out, 1, 2)[:, : st.q_len]
  return out if lse is None else (out, lse[:, :, : st.q_len])


def prepare(q, k, v, *, causal=False, scale=None, key_padding_mask=None,
            segment_ids=None, kv_segment_ids=None, bias=None, mask=None,
            causal_alignment="bottom_right", local_window_size=None,
            logits_soft_cap=None, dropout_rate=0.0, dropout_rng=None,
            return_lse=False, block_sizes=None, interpret=False):
  """Checks the arguments and lays them out for the kernels.

  Returns (q [b, h, q_pad, d], k [b, hkv, kv_pad, d], v [b, hkv, kv_pad, dv],
  the `_Aux` arrays, the `TpuStatic`): what `_attention` takes, and what
  `kernels.bench.tpu_compile` compiles each kernel from.
  """
  shape = masking.check_qkv(q, k, v)
  if q.dtype == jnp.float16:
    raise ValueError(
        "implementation='tpu' takes bfloat16 or float32: Mosaic TPU has no"
        " float16 loads or arithmetic (v4, v5e: the kernel fails to compile);"
        " cast to bfloat16.")
  segments = masking.segments_from_masks(
      shape, key_padding_mask, segment_ids, kv_segment_ids)
  bias, bias_layout = variants.check_broadcast("bias", bias, shape, boolean=False)
  mask, mask_layout = variants.check_broadcast("mask", mask, shape, boolean=True)
  var = variants.Variants(
      window=variants.check_window(local_window_size),
      soft_cap=variants.check_soft_cap(logits_soft_cap),
      dropout_rate=variants.check_dropout(dropout_rate, dropout_rng),
      bias=bias_layout, mask=mask_layout, return_lse=bool(return_lse))
  if block_sizes is None:
    block_sizes = TpuBlockSizes.get_default(max(shape.head_dim, shape.v_head_dim))
  elif not isinstance(block_sizes, TpuBlockSizes):
    raise ValueError(f"block_sizes must be a TpuBlockSizes, got {block_sizes!r}.")
  tiles_ = kernel_tiles(block_sizes, shape, bool(interpret))
  st = TpuStatic(
      scale=masking.default_scale(shape.head_dim, scale), causal=bool(causal),
      q_len=shape.q_len, kv_len=shape.kv_len, group=shape.group_size,
      has_segments=segments is not None, blocks=block_sizes, tiles=tiles_,
      interpret=bool(interpret),
      offset=variants.alignment_offset(shape, causal_alignment), var=var)
  # Powers of two: the largest tile of each side is a multiple of the others.
  q_tile, kv_tile = max(t[0] for t in tiles_), max(t[1] for t in tiles_)
  q_pad = pl.cdiv(shape.q_len, q_tile) * q_tile
  kv_pad = pl.cdiv(shape.kv_len, kv_tile) * kv_tile
  head_major = lambda x, n: jnp.swapaxes(pad_axis(x, 1, n), 1, 2)
  qp, kp, vp = head_major(q, q_pad), head_major(k, kv_pad), head_major(v, kv_pad)
  q_ids = kv_ids = None
  if segments is not None:
    segments = (pad_axis(segments[0], 1, q_pad),
                pad_axis(segments[1], 1, kv_pad, value=masking.PAD_SEGMENT))
    q_ids = jnp.broadcast_to(segments[0][:, :, None], (shape.batch, q_pad, ROW_LANES))
    kv_ids = jnp.broadcast_to(segments[1][:, None, :],
                              (shape.batch, SUBLANES, kv_pad))
  ranges = [
      tiles.kv_block_ranges(st, *tiles_[0], q_pad, kv_pad, segments),
      tiles.kv_block_ranges(st, *tiles_[1], q_pad, kv_pad, segments),
      tiles.q_block_ranges(st, *tiles_[2], q_pad, kv_pad, segments),
  ]
  pad_lengths = lambda x: pad_axis(pad_axis(x, 2, q_pad), 3, kv_pad)
  aux = _Aux(
      q_ids, kv_ids, *ranges,
      None if bias is None else pad_lengths(bias),
      # int8: nonzero = attend; padded rows and keys are hidden.
      None if mask is None else pad_lengths(mask.astype(jnp.int8)),
      None if var.dropout_rate == 0.0 else tiles.seed_array(dropout_rng))
  return qp, kp, vp, aux, st
