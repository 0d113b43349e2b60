"""Fused softmax attention (FlashAttention-2) in Pallas: forward and backward.

One source serves two backends: on NVIDIA GPUs Pallas lowers it to Triton, and
elsewhere (`interpret=True`) Pallas' interpreter runs it on the CPU, which is
how the test suite checks it. Layout and mask semantics are those of
`kernels.masking` (bottom-right causal alignment, key padding, segment ids).

Algorithm (Dao, "FlashAttention-2", 2023):
  * forward (Algorithm 1): each program owns one block of query rows of one
    head, streams key/value blocks through an online softmax, and writes the
    output and the row log-sum-exp L (kept for the backward pass);
  * backward (Algorithm 2): one kernel per key/value block accumulates dK and
    dV over query blocks, one kernel per query block accumulates dQ over key
    blocks; both recompute P = exp(S - L) blockwise, so no [q_len, kv_len]
    array is ever stored, and D = rowsum(dO * O) (section 3.1.2) is an O(N d)
    elementwise pass.
Scores are kept in log2 units (log2(e) folded into the softmax scale) so the
exponentials are `exp2`, as in FlashAttention-2's Triton kernels.

Grouped-query heads index their key/value head in the BlockSpec (head h reads
kv head h // group), so K and V are never repeated; the dK/dV kernel sums the
group's query heads in its loop. Blocks are skipped only through loop
bounds, never by a branch, so every load in a loop is unconditional and
Triton's software pipeliner can make it asynchronous (cp.async): the causal
diagonal bounds each loop, and so do per-block ranges of the blocks whose
segment ids can meet (`masking.segment_block_ranges`), and the local
window's two diagonals; within them hidden pairs are masked with `where`.
The dK/dV kernel works on transposed tiles (S^T) so that each of its products
has block_k_dkv rows, enough for Hopper's wgmma. The tile bodies are in
`kernels.triton.tiles`.

Variants (`kernels.variants`), each a static specialisation: an additive
bias and a per-head mask are read tile by tile beside the scores (a bias
shared by the batch or the heads is stored once and indexed so); d bias is
dS, written by a fourth kernel, one tile per program, only when a bias is
given (XLA drops it when d bias is unused). The soft-cap's derivative
(1 - tanh^2) multiplies dS. Dropout draws Philox bits from (seed, batch,
head, row, column) in the forward and again in both backward kernels, so the
mask is never stored. With the log-sum-exp as an output, its cotangent
enters as dS = P (dP - (D - dlse)). The value head dim may differ from the
query/key one (each is padded on its own).

The wrapper pads sequence lengths to the block sizes and the head dimension to
a power of two (Triton tiles are powers of two); padded keys are masked and
padded rows and columns are sliced away.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedlm.kernels import masking, target, variants
from fusedlm.kernels.tiling import pad_axis
from fusedlm.kernels.triton import notice, tiles
from fusedlm.kernels.triton.block_sizes import BlockSizes, check_fits, clamp, padded_head_dim
from fusedlm.kernels.triton.tiles import TritonStatic

LN2 = math.log(2.0)

def _cost(q, k, st: TritonStatic, passes: float) -> pl.CostEstimate:
  b, nq, h, d = q.shape
  nk = k.shape[1]
  pairs = b * h * nq * nk * (0.5 if st.causal else 1.0)
  itemsize = q.dtype.itemsize
  return pl.CostEstimate(
      flops=int(4 * d * pairs * passes),
      transcendentals=int(pairs * (1 if passes == 1 else 2)),
      bytes_accessed=int((2 * q.size + 2 * k.size) * itemsize * passes),
  )


def _compiler_params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _segment_specs(segments, block_q: int, block_k: int, by_kv: bool):
  """BlockSpecs and arrays of the segment ids and block ranges of one kernel.

  by_kv: the grid's first axis walks key blocks (dK/dV) instead of query
  blocks (forward, dQ).
  """
  q_segments, kv_segments = segments
  q_pad, kv_pad = q_segments.shape[1], kv_segments.shape[1]
  kv_range, q_range = masking.segment_block_ranges(q_segments, kv_segments,
                                                   block_q, block_k)
  if by_kv:
    specs = [
        pl.BlockSpec((None, q_pad), lambda j, b, g: (b, 0)),
        pl.BlockSpec((None, block_k), lambda j, b, g: (b, j)),
        pl.BlockSpec((None, None, 2), lambda j, b, g: (b, j, 0)),
    ]
    return specs, [q_segments, kv_segments, q_range]
  specs = [
      pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
      pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0)),
      pl.BlockSpec((None, None, 2), lambda i, b, h: (b, i, 0)),
  ]
  return specs, [q_segments, kv_segments, kv_range]


def _variant_specs(extras, st: TritonStatic, block_q: int, block_k: int, by_kv: bool):
  """BlockSpecs and arrays of the bias, mask and dropout seed of one kernel.

  Bias and mask are [batch|1, heads|1, q_pad, kv_pad]; a broadcast axis is
  indexed at 0, so it is never materialised.
  """
  specs, arrays = [], []
  q_pad, kv_pad = extras.q_pad, extras.kv_pad
  for array, layout in ((extras.bias, st.var.bias), (extras.mask, st.var.mask)):
    if layout is None:
      continue
    per_batch, per_head = layout
    if by_kv:
      group = st.group
      block = (None, group if per_head else None, q_pad, block_k)
      index = lambda j, b, g, pb=per_batch, ph=per_head: (
          b if pb else 0, g if ph else 0, 0, j)
    else:
      block = (None, None, block_q, kv_pad)
      index = lambda i, b, h, pb=per_batch, ph=per_head: (
          b if pb else 0, h if ph else 0, i, 0)
    specs.append(pl.BlockSpec(block, index))
    arrays.append(array)
  if st.var.dropout_rate > 0.0:
    specs.append(pl.BlockSpec((2,), lambda *_: (0,)))
    arrays.append(extras.seed)
  return specs, arrays


class _Extras:
  """The padded arrays of the variants (a pytree: residuals of the VJP)."""

  def __init__(self, bias, mask, seed, q_pad: int, kv_pad: int):
    self.bias, self.mask, self.seed = bias, mask, seed
    self.q_pad, self.kv_pad = q_pad, kv_pad


jax.tree_util.register_pytree_node(
    _Extras,
    lambda e: ((e.bias, e.mask, e.seed), (e.q_pad, e.kv_pad)),
    lambda aux, children: _Extras(*children, *aux),
)


def _forward(q, k, v, segments, extras, st: TritonStatic):
  """Pallas forward on padded inputs: (out [b, q_pad, h, dv], lse [b, h, q_pad]).

  lse is in log2 units, +inf on rows that see no key.
  """
  b, q_pad, h, d = q.shape
  kv_pad, dv = k.shape[1], v.shape[3]
  block_q = clamp(st.blocks.block_q, st.q_len)
  block_k = clamp(st.blocks.block_k, st.kv_len)
  group = st.group
  in_specs = [
      pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, kv_pad, None, d), lambda i, b, h: (b, 0, h // group, 0)),
      pl.BlockSpec((None, kv_pad, None, dv), lambda i, b, h: (b, 0, h // group, 0)),
  ]
  args = [q, k, v]
  if st.has_segments:
    specs, arrays = _segment_specs(segments, block_q, block_k, by_kv=False)
    in_specs += specs
    args += arrays
  specs, arrays = _variant_specs(extras, st, block_q, block_k, by_kv=False)
  in_specs += specs
  args += arrays
  return pl.pallas_call(
      functools.partial(tiles.fwd_kernel, st=st, block_q=block_q,
                        block_k=block_k),
      grid=(q_pad // block_q, b, h),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, block_q, None, dv), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, q_pad, h, dv), q.dtype),
          jax.ShapeDtypeStruct((b, h, q_pad), jnp.float32),
      ],
      compiler_params=_compiler_params(st.blocks.num_warps_fwd,
                                       st.blocks.num_stages_fwd),
      cost_estimate=_cost(q, k, st, 1.0),
      interpret=st.interpret,
      name="fusedlm_flash_fwd",
  )(*args)


def _backward(q, k, v, segments, extras, out, lse, do, dlse, st: TritonStatic):
  """Pallas backward on padded inputs: (dq, dk, dv, d bias or None)."""
  b, q_pad, h, d = q.shape
  kv_pad, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  group = st.group
  # D = rowsum(dO * O), FlashAttention-2 Algorithm 2 line 4: O(N d), no kernel needed.
  delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32),
                     out.astype(jnp.float32))
  if dlse is not None:
    # d lse_i / d x_ij = P_ij, so dS = P (dP - D) + P dlse = P (dP - (D - dlse)).
    delta = delta - dlse

  block_q = clamp(st.blocks.block_q_dkv, st.q_len)
  block_k = clamp(st.blocks.block_k_dkv, st.kv_len)
  q_group = pl.BlockSpec((None, q_pad, group, d), lambda j, b, g: (b, 0, g, 0))
  do_group = pl.BlockSpec((None, q_pad, group, dv), lambda j, b, g: (b, 0, g, 0))
  row_group = pl.BlockSpec((None, group, q_pad), lambda j, b, g: (b, g, 0))
  k_block = pl.BlockSpec((None, block_k, None, d), lambda j, b, g: (b, j, g, 0))
  v_block = pl.BlockSpec((None, block_k, None, dv), lambda j, b, g: (b, j, g, 0))
  in_specs = [q_group, k_block, v_block, do_group, row_group, row_group]
  args = [q, k, v, do, lse, delta]
  if st.has_segments:
    specs, arrays = _segment_specs(segments, block_q, block_k, by_kv=True)
    in_specs += specs
    args += arrays
  specs, arrays = _variant_specs(extras, st, block_q, block_k, by_kv=True)
  in_specs += specs
  args += arrays
  dk, dv_ = pl.pallas_call(
      functools.partial(tiles.dkv_kernel, st=st, block_q=block_q,
                        block_k=block_k),
      grid=(kv_pad // block_k, b, hkv),
      in_specs=in_specs,
      out_specs=[k_block, v_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(st.blocks.num_warps_bwd,
                                       st.blocks.num_stages_bwd),
      cost_estimate=_cost(q, k, st, 2.0),
      interpret=st.interpret,
      name="fusedlm_flash_bwd_dkv",
  )(*args)

  block_q = clamp(st.blocks.block_q_dq, st.q_len)
  block_k = clamp(st.blocks.block_k_dq, st.kv_len)
  q_block = pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0))
  do_block = pl.BlockSpec((None, block_q, None, dv), lambda i, b, h: (b, i, h, 0))
  k_full = pl.BlockSpec((None, kv_pad, None, d),
                        lambda i, b, h: (b, 0, h // group, 0))
  v_full = pl.BlockSpec((None, kv_pad, None, dv),
                        lambda i, b, h: (b, 0, h // group, 0))
  row_block = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  in_specs = [q_block, k_full, v_full, do_block, row_block, row_block]
  args = [q, k, v, do, lse, delta]
  if st.has_segments:
    specs, arrays = _segment_specs(segments, block_q, block_k, by_kv=False)
    in_specs += specs
    args += arrays
  specs, arrays = _variant_specs(extras, st, block_q, block_k, by_kv=False)
  in_specs += specs
  args += arrays
  dq = pl.pallas_call(
      functools.partial(tiles.dq_kernel, st=st, block_q=block_q,
                        block_k=block_k),
      grid=(q_pad // block_q, b, h),
      in_specs=in_specs,
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(
          st.blocks.num_warps_dq or st.blocks.num_warps_bwd,
          st.blocks.num_stages_dq or st.blocks.num_stages_bwd),
      cost_estimate=_cost(q, k, st, 1.5),
      interpret=st.interpret,
      name="fusedlm_flash_bwd_dq",
  )(*args)
  dbias = None
  if st.var.bias is not None:
    dbias = _dbias(q, k, v, segments, extras, lse, delta, do, st)
  return dq, dk, dv_, dbias


def _dbias(q, k, v, segments, extras, lse, delta, do, st: TritonStatic):
  """d bias = dS, one [block_q_dq, block_k_dq] tile per program, summed over
  the axes the bias broadcasts: [batch|1, heads|1, q_pad, kv_pad] float32."""
  b, q_pad, h, d = q.shape
  kv_pad, dv = k.shape[1], v.shape[3]
  group = st.group
  block_q = clamp(st.blocks.block_q_dq, st.q_len)
  block_k = clamp(st.blocks.block_k_dq, st.kv_len)
  q_tile = pl.BlockSpec((None, block_q, None, d),
                        lambda i, j, bh: (bh // h, i, bh % h, 0))
  do_tile = pl.BlockSpec((None, block_q, None, dv),
                         lambda i, j, bh: (bh // h, i, bh % h, 0))
  k_tile = pl.BlockSpec((None, block_k, None, d),
                        lambda i, j, bh: (bh // h, j, (bh % h) // group, 0))
  v_tile = pl.BlockSpec((None, block_k, None, dv),
                        lambda i, j, bh: (bh // h, j, (bh % h) // group, 0))
  row = pl.BlockSpec((None, None, block_q), lambda i, j, bh: (bh // h, bh % h, i))
  in_specs = [q_tile, k_tile, v_tile, do_tile, row, row]
  args = [q, k, v, do, lse, delta]
  if st.has_segments:
    in_specs += [pl.BlockSpec((None, block_q), lambda i, j, bh: (bh // h, i)),
                 pl.BlockSpec((None, block_k), lambda i, j, bh: (bh // h, j))]
    args += list(segments)
  for array, layout in ((extras.bias, st.var.bias), (extras.mask, st.var.mask)):
    if layout is not None:
      in_specs.append(pl.BlockSpec(
          (None, None, block_q, block_k),
          lambda i, j, bh, pb=layout[0], ph=layout[1]: (
              bh // h if pb else 0, bh % h if ph else 0, i, j)))
      args.append(array)
  if st.var.dropout_rate > 0.0:
    in_specs.append(pl.BlockSpec((2,), lambda *_: (0,)))
    args.append(extras.seed)
  ds = pl.pallas_call(
      functools.partial(tiles.dbias_kernel, st=st, num_heads=h),
      grid=(q_pad // block_q, kv_pad // block_k, b * h),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, block_q, block_k),
                             lambda i, j, bh: (bh // h, bh % h, i, j)),
      out_shape=jax.ShapeDtypeStruct((b, h, q_pad, kv_pad), jnp.float32),
      compiler_params=_compiler_params(
          st.blocks.num_warps_dq or st.blocks.num_warps_bwd, 1),
      interpret=st.interpret,
      name="fusedlm_flash_bwd_dbias",
  )(*args)
  per_batch, per_head = st.var.bias
  axes = tuple(a for a, keep in ((0, per_batch), (1, per_head)) if not keep)
  ds = jnp.sum(ds, axis=axes, keepdims=True) if axes else ds
  return ds.astype(extras.bias.dtype)


def _lse_out(lse):
  """The kernels' log2-unit lse (+inf: no key) as natural log (-inf: no key)."""
  return jnp.where(jnp.isinf(lse), -jnp.inf, lse * LN2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, segments, extras, st: TritonStatic):
  out, lse = _forward(q, k, v, segments, extras, st)
  return (out, _lse_out(lse)) if st.var.return_lse else out


def _flash_fwd(q, k, v, segments, extras, st: TritonStatic):
  out, lse = _forward(q, k, v, segments, extras, st)
  primal = (out, _lse_out(lse)) if st.var.return_lse else out
  return primal, (q, k, v, segments, extras, out, lse)


def _flash_bwd(st: TritonStatic, residuals, cotangent):
  q, k, v, segments, extras, out, lse = residuals
  do, dlse = cotangent if st.var.return_lse else (cotangent, None)
  dq, dk, dv, dbias = _backward(q, k, v, segments, extras, out, lse, do, dlse, st)
  dextras = _Extras(dbias, None, None, extras.q_pad, extras.kv_pad)
  return dq, dk, dv, None, dextras


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(
    jax.jit,
    static_argnames=("causal", "scale", "block_sizes", "interpret",
                     "causal_alignment", "local_window_size", "logits_soft_cap",
                     "dropout_rate", "return_lse"),
)
def flash_attention(
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
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
):  # out [batch, q_len, num_heads, v_head_dim], q.dtype; with return_lse
    # also lse [batch, num_heads, q_len] float32
  """Fused attention through the Pallas kernels, differentiable in q, k, v, bias.

  Mask semantics are those of `kernels.masking`, the variants' those of
  `kernels.variants`. `interpret=True` runs the kernels in Pallas'
  interpreter (any backend, e.g. CPU); otherwise they are compiled through
  Triton, which needs an NVIDIA GPU.
  """
  # The device the call is traced for (kernels.target): a compile-only GPU
  # counts, so whole steps compile for an H100 on a CPU machine.
  device = target.current_device()
  if not interpret and not target.is_gpu(device):
    raise ValueError(
        "the Pallas kernel compiles only for NVIDIA GPUs (through Triton); on"
        f" a {target.describe(device)} pass interpret=True or use"
        " implementation='xla'."
    )
  if not interpret:
    notice.notice_once()
  return flash_attention_any_device(
      q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, bias=bias,
      mask=mask, causal_alignment=causal_alignment,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_lse=return_lse,
      block_sizes=block_sizes, interpret=interpret,
  )


def flash_attention_any_device(q, k, v, *, causal=False, scale=None,
                          key_padding_mask=None, segment_ids=None,
                          kv_segment_ids=None, bias=None, mask=None,
                          causal_alignment="bottom_right",
                          local_window_size=None, logits_soft_cap=None,
                          dropout_rate=0.0, dropout_rng=None, return_lse=False,
                          block_sizes=None, interpret=False):
  """`flash_attention` without its backend check, unjitted.

  For lowering the Triton kernels for a GPU on a machine without one
  (`kernels.bench.triton_compile`); callers should use `flash_attention`.
  """
  shape = masking.check_qkv(q, k, v)
  segments = masking.segments_from_masks(
      shape, key_padding_mask, segment_ids, kv_segment_ids
  )
  bias, bias_layout = variants.check_broadcast("bias", bias, shape, boolean=False)
  mask, mask_layout = variants.check_broadcast("mask", mask, shape, boolean=True)
  var = variants.Variants(
      window=variants.check_window(local_window_size),
      soft_cap=variants.check_soft_cap(logits_soft_cap),
      dropout_rate=variants.check_dropout(dropout_rate, dropout_rng),
      bias=bias_layout, mask=mask_layout, return_lse=bool(return_lse),
  )
  offset = variants.alignment_offset(shape, causal_alignment)
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(
        max(shape.head_dim, shape.v_head_dim), q.dtype,
        dropout=var.dropout_rate > 0.0, bias=var.bias is not None)
  elif not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {block_sizes!r}.")
  head_pad = padded_head_dim(shape.head_dim)
  v_head_pad = padded_head_dim(shape.v_head_dim)
  check_fits(block_sizes, max(head_pad, v_head_pad), q.dtype.itemsize)
  st = TritonStatic(
      scale=masking.default_scale(shape.head_dim, scale),
      causal=bool(causal),
      q_len=shape.q_len,
      kv_len=shape.kv_len,
      group=shape.group_size,
      has_segments=segments is not None,
      blocks=block_sizes,
      interpret=bool(interpret),
      offset=offset,
      var=var,
  )
  bs = block_sizes
  # Blocks are powers of two, so the largest of each side is a multiple of
  # the others: one padded length serves all the kernels.
  q_block = max(
      clamp(b, shape.q_len) for b in (bs.block_q, bs.block_q_dkv, bs.block_q_dq))
  q_pad = pl.cdiv(shape.q_len, q_block) * q_block
  kv_block = max(
      clamp(b, shape.kv_len) for b in (bs.block_k, bs.block_k_dkv, bs.block_k_dq))
  kv_pad = pl.cdiv(shape.kv_len, kv_block) * kv_block

  qp = pad_axis(pad_axis(q, 3, head_pad), 1, q_pad)
  kp = pad_axis(pad_axis(k, 3, head_pad), 1, kv_pad)
  vp = pad_axis(pad_axis(v, 3, v_head_pad), 1, kv_pad)
  if segments is not None:
    q_segments, kv_segments = segments
    segments = (
        pad_axis(q_segments, 1, q_pad),
        pad_axis(kv_segments, 1, kv_pad, value=masking.PAD_SEGMENT),
    )
  pad_lengths = lambda x: pad_axis(pad_axis(x, 2, q_pad), 3, kv_pad)
  extras = _Extras(
      None if bias is None else pad_lengths(bias),
      # int8: nonzero = attend; padded rows and keys are hidden.
      None if mask is None else pad_lengths(mask.astype(jnp.int8)),
      None if var.dropout_rate == 0.0 else variants.seed_words(dropout_rng),
      q_pad, kv_pad)
  result = _flash(qp, kp, vp, segments, extras, st)
  out, lse = result if var.return_lse else (result, None)
  out = out[:, : shape.q_len, :, : shape.v_head_dim]
  return out if lse is None else (out, lse[:, :, : shape.q_len])
