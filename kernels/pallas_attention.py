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
segment ids can meet (`masking.segment_block_ranges`); within them hidden pairs are
masked with `where`. The dK/dV kernel works on transposed tiles (S^T) so
that each of its products has block_k_dkv rows, enough for Hopper's wgmma.

The wrapper pads sequence lengths to the block sizes and the head dimension to
a power of two (Triton tiles are powers of two); padded keys are masked and
padded rows and columns are sliced away.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import masking, triton_notice
from kernels.block_sizes import BlockSizes, check_fits, clamp, padded_head_dim

LOG2E = math.log2(math.e)

@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on (hashable: a custom_vjp nondiff arg)."""

  scale: float
  causal: bool
  q_len: int  # unpadded lengths: they fix the causal diagonal and the tails
  kv_len: int
  group: int
  has_segments: bool
  blocks: BlockSizes
  interpret: bool

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len

  @property
  def scale_log2(self) -> float:
    return self.scale * LOG2E


def _dot(a, b, contract_a: int, contract_b: int):
  """a . b contracting one axis each, accumulating in float32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(
      a, b, (((contract_a,), (contract_b,)), ((), ())),
      precision=precision, preferred_element_type=jnp.float32,
  )


def _visible(q_pos, k_pos, q_segments, kv_segments, block_k: int, st: _Static):
  """Which (query, key) pairs of a tile may attend, or None if all may.

  Positions and segment ids come shaped to broadcast against each other:
  [block_q, 1] against [1, block_k] for a tile of S, or the transpose for a
  tile of S^T (the dK/dV kernel).
  """
  visible = None
  if st.causal:
    visible = k_pos <= q_pos + st.offset
  if st.has_segments:
    # Padded keys carry PAD_SEGMENT, so this also hides the padded tail.
    same = q_segments == kv_segments
    visible = same if visible is None else visible & same
  elif st.kv_len % block_k:
    tail = k_pos < st.kv_len
    visible = tail if visible is None else visible & tail
  return visible


def _masked_scores(q, k, q_start, k_start, q_segments, kv_segments, st: _Static):
  """Scores S * log2(e) of one tile, [block_q, block_k] float32, -inf where hidden."""
  s = _dot(q, k, 1, 1) * st.scale_log2
  block_q, block_k = s.shape
  visible = _visible(
      q_start + jnp.arange(block_q)[:, None], k_start + jnp.arange(block_k)[None, :],
      None if q_segments is None else q_segments[:, None],
      None if kv_segments is None else kv_segments[None, :], block_k, st)
  return s if visible is None else jnp.where(visible, s, -jnp.inf)


def _masked_scores_t(k, q, k_start, q_start, kv_segments, q_segments, st: _Static):
  """S^T * log2(e) of one tile, [block_k, block_q]: keys are the rows.

  The dK/dV kernel's products all have block_k rows this way (K Q^T, V dO^T,
  dS^T Q, P^T dO), so with block_k >= 64 every one of them can be a Hopper
  wgmma, whose M (rows) must be a multiple of 64.
  """
  s = _dot(k, q, 1, 1) * st.scale_log2
  block_k, block_q = s.shape
  visible = _visible(
      q_start + jnp.arange(block_q)[None, :], k_start + jnp.arange(block_k)[:, None],
      None if q_segments is None else q_segments[None, :],
      None if kv_segments is None else kv_segments[:, None], block_k, st)
  return s if visible is None else jnp.where(visible, s, -jnp.inf)


def _kv_blocks_upper(q_start, block_q: int, block_k: int, st: _Static):
  """One past the last key block that any of these query rows can see."""
  last = pl.cdiv(st.kv_len, block_k)
  if not st.causal:
    return last
  # ceil((q_start + block_q + offset) / block_k), clamped to [0, last].
  visible_end = q_start + block_q + st.offset
  upper = lax.div(jnp.maximum(visible_end, 0) + block_k - 1, block_k)
  return jnp.minimum(upper, last)


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, st: _Static, block_q, block_k):
  # q_ref [block_q, d]; k_ref, v_ref [kv_pad, d]; o_ref [block_q, d];
  # lse_ref [block_q]; with segments: q_seg_ref [block_q], kv_seg_ref [kv_pad],
  # range_ref [2] (the key blocks these rows' segments meet).
  if st.has_segments:
    q_seg_ref, kv_seg_ref, range_ref, o_ref, lse_ref = refs
  else:
    o_ref, lse_ref = refs
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]
  q_segments = q_seg_ref[...] if st.has_segments else None

  def body(j, carry):
    acc, m_prev, l_prev = carry
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    kv_segments = (kv_seg_ref[pl.ds(k_start, block_k)]
                   if st.has_segments else None)
    s = _masked_scores(q, k, q_start, k_start, q_segments, kv_segments, st)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # A row that has seen only hidden keys keeps m = -inf; shift it by 0
    # instead so exp2 gives 0, not NaN.
    m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp2(s - m_shift[:, None])
    correction = jnp.exp2(m_prev - m_shift)
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_next, l_next

  head_dim = q.shape[-1]
  carry = (
      jnp.zeros((block_q, head_dim), jnp.float32),
      jnp.full((block_q,), -jnp.inf, jnp.float32),
      jnp.zeros((block_q,), jnp.float32),
  )
  lower, upper = 0, _kv_blocks_upper(q_start, block_q, block_k, st)
  if st.has_segments:
    lower, upper = range_ref[0], jnp.minimum(upper, range_ref[1])
  acc, m, l = lax.fori_loop(lower, upper, body, carry)
  # Final rescaling (FlashAttention-2, Algorithm 1, line 12); empty rows -> 0.
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  # L = +inf on empty rows makes every recomputed P exactly 0 there.
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                st: _Static, block_q, block_k):
  # q_ref, do_ref [q_pad, group, d]; lse_ref, delta_ref [group, q_pad];
  # k_ref, v_ref, dk_ref, dv_ref [block_k, d]; with segments: q_seg_ref
  # [q_pad], kv_seg_ref [block_k], range_ref [2] (query blocks they meet).
  # Works on transposed tiles (S^T, P^T, dP^T, dS^T: [block_k, block_q]),
  # so that every product has block_k rows (see _masked_scores_t).
  if st.has_segments:
    q_seg_ref, kv_seg_ref, range_ref, dk_ref, dv_ref = refs
  else:
    dk_ref, dv_ref = refs
  k_start = pl.program_id(0) * block_k
  k = k_ref[...]
  v = v_ref[...]
  kv_segments = kv_seg_ref[...] if st.has_segments else None

  lower, upper = 0, pl.cdiv(st.q_len, block_q)
  if st.causal:
    # First query row that sees key k_start is k_start - offset.
    lower = lax.div(jnp.maximum(k_start - st.offset, 0), block_q)
  if st.has_segments:
    lower = jnp.maximum(lower, range_ref[0])
    upper = jnp.minimum(upper, range_ref[1])

  def over_q_blocks(g, carry):
    def body(i, carry):
      dk, dv = carry
      q_start = i * block_q
      q = q_ref[pl.ds(q_start, block_q), g, :]
      do = do_ref[pl.ds(q_start, block_q), g, :]
      lse = lse_ref[g, pl.ds(q_start, block_q)]
      delta = delta_ref[g, pl.ds(q_start, block_q)]
      q_segments = (q_seg_ref[pl.ds(q_start, block_q)]
                    if st.has_segments else None)
      s_t = _masked_scores_t(k, q, k_start, q_start, kv_segments, q_segments, st)
      p_t = jnp.exp2(s_t - lse[None, :])  # [block_k, block_q]
      dv = dv + _dot(p_t.astype(do.dtype), do, 1, 0)
      dp_t = _dot(v, do, 1, 1)
      ds_t = p_t * (dp_t - delta[None, :])
      dk = dk + _dot(ds_t.astype(q.dtype), q, 1, 0)
      return dk, dv

    return lax.fori_loop(lower, upper, body, carry)

  head_dim = k.shape[-1]
  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(0, st.group, over_q_blocks, (zeros, zeros))
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               st: _Static, block_q, block_k):
  # q_ref, do_ref, dq_ref [block_q, d]; k_ref, v_ref [kv_pad, d];
  # lse_ref, delta_ref [block_q]; with segments: q_seg_ref [block_q],
  # kv_seg_ref [kv_pad], range_ref [2] (key blocks these rows' segments meet).
  if st.has_segments:
    q_seg_ref, kv_seg_ref, range_ref, dq_ref = refs
  else:
    (dq_ref,) = refs
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_segments = q_seg_ref[...] if st.has_segments else None

  def body(j, dq):
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    kv_segments = (kv_seg_ref[pl.ds(k_start, block_k)]
                   if st.has_segments else None)
    s = _masked_scores(q, k, q_start, k_start, q_segments, kv_segments, st)
    p = jnp.exp2(s - lse[:, None])
    ds = p * (_dot(do, v, 1, 1) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, 1, 0)

  lower, upper = 0, _kv_blocks_upper(q_start, block_q, block_k, st)
  if st.has_segments:
    lower, upper = range_ref[0], jnp.minimum(upper, range_ref[1])
  dq = lax.fori_loop(lower, upper, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _cost(q, k, st: _Static, passes: float) -> pl.CostEstimate:
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


def _forward(q, k, v, segments, st: _Static):
  """Pallas forward on padded inputs: (out [b, q_pad, h, d], lse [b, h, q_pad])."""
  b, q_pad, h, d = q.shape
  kv_pad = k.shape[1]
  block_q = clamp(st.blocks.block_q, st.q_len)
  block_k = clamp(st.blocks.block_k, st.kv_len)
  group = st.group
  in_specs = [
      pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, kv_pad, None, d), lambda i, b, h: (b, 0, h // group, 0)),
      pl.BlockSpec((None, kv_pad, None, d), lambda i, b, h: (b, 0, h // group, 0)),
  ]
  args = [q, k, v]
  if st.has_segments:
    specs, arrays = _segment_specs(segments, block_q, block_k, by_kv=False)
    in_specs += specs
    args += arrays
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, block_q=block_q, block_k=block_k),
      grid=(q_pad // block_q, b, h),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((b, h, q_pad), jnp.float32),
      ],
      compiler_params=_compiler_params(st.blocks.num_warps_fwd,
                                       st.blocks.num_stages_fwd),
      cost_estimate=_cost(q, k, st, 1.0),
      interpret=st.interpret,
      name="fusedlm_flash_fwd",
  )(*args)


def _backward(q, k, v, segments, out, lse, do, st: _Static):
  """Pallas backward on padded inputs: (dq, dk, dv)."""
  b, q_pad, h, d = q.shape
  kv_pad, hkv = k.shape[1], k.shape[2]
  group = st.group
  # D = rowsum(dO * O), FlashAttention-2 Algorithm 2 line 4: O(N d), no kernel needed.
  delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32),
                     out.astype(jnp.float32))

  block_q = clamp(st.blocks.block_q_dkv, st.q_len)
  block_k = clamp(st.blocks.block_k_dkv, st.kv_len)
  q_group = pl.BlockSpec((None, q_pad, group, d), lambda j, b, g: (b, 0, g, 0))
  row_group = pl.BlockSpec((None, group, q_pad), lambda j, b, g: (b, g, 0))
  kv_block = pl.BlockSpec((None, block_k, None, d), lambda j, b, g: (b, j, g, 0))
  in_specs = [q_group, kv_block, kv_block, q_group, row_group, row_group]
  args = [q, k, v, do, lse, delta]
  if st.has_segments:
    specs, arrays = _segment_specs(segments, block_q, block_k, by_kv=True)
    in_specs += specs
    args += arrays
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, block_q=block_q, block_k=block_k),
      grid=(kv_pad // block_k, b, hkv),
      in_specs=in_specs,
      out_specs=[kv_block, kv_block],
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
  kv_full = pl.BlockSpec((None, kv_pad, None, d),
                         lambda i, b, h: (b, 0, h // group, 0))
  row_block = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  in_specs = [q_block, kv_full, kv_full, q_block, row_block, row_block]
  args = [q, k, v, do, lse, delta]
  if st.has_segments:
    specs, arrays = _segment_specs(segments, block_q, block_k, by_kv=False)
    in_specs += specs
    args += arrays
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, block_q=block_q, block_k=block_k),
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
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segments, st: _Static):
  return _forward(q, k, v, segments, st)[0]


def _flash_fwd(q, k, v, segments, st: _Static):
  out, lse = _forward(q, k, v, segments, st)
  return out, (q, k, v, segments, out, lse)


def _flash_bwd(st: _Static, residuals, do):
  q, k, v, segments, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, segments, out, lse, do, st)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


@functools.partial(
    jax.jit,
    static_argnames=("causal", "scale", "block_sizes", "interpret"),
)
def flash_attention(
    q,  # [batch, q_len, num_heads, head_dim]
    k,  # [batch, kv_len, num_kv_heads, head_dim]
    v,  # [batch, kv_len, num_kv_heads, head_dim]
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask=None,  # [batch, kv_len] bool, True = attend
    segment_ids=None,  # [batch, q_len] int
    kv_segment_ids=None,  # [batch, kv_len] int; defaults to segment_ids
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim], q.dtype
  """Fused attention through the Pallas kernels, differentiable in q, k, v.

  Mask semantics are those of `kernels.masking`. `interpret=True` runs the
  kernels in Pallas' interpreter (any backend, e.g. CPU); otherwise they are
  compiled through Triton, which needs an NVIDIA GPU.
  """
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(
        "the Pallas kernel compiles only for NVIDIA GPUs (through Triton); on"
        f" the {jax.default_backend()!r} backend pass interpret=True or use"
        " implementation='xla'."
    )
  if not interpret:
    triton_notice.notice_once()
  return attention_any_backend(
      q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
      block_sizes=block_sizes, interpret=interpret,
  )


def attention_any_backend(q, k, v, *, causal=False, scale=None,
                          key_padding_mask=None, segment_ids=None,
                          kv_segment_ids=None, block_sizes=None,
                          interpret=False):
  """`flash_attention` without its backend check, unjitted.

  For lowering the Triton kernels for a GPU on a machine without one
  (`kernels.inspect`); callers should use `flash_attention`.
  """
  shape = masking.check_qkv(q, k, v)
  segments = masking.segments_from_masks(
      shape, key_padding_mask, segment_ids, kv_segment_ids
  )
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(shape.head_dim, q.dtype)
  elif not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {block_sizes!r}.")
  head_pad = padded_head_dim(shape.head_dim)
  check_fits(block_sizes, head_pad, q.dtype.itemsize)
  st = _Static(
      scale=masking.default_scale(shape.head_dim, scale),
      causal=bool(causal),
      q_len=shape.q_len,
      kv_len=shape.kv_len,
      group=shape.group_size,
      has_segments=segments is not None,
      blocks=block_sizes,
      interpret=bool(interpret),
  )
  bs = block_sizes
  # Blocks are powers of two, so the largest of each side is a multiple of
  # the others: one padded length serves all three kernels.
  q_block = max(
      clamp(b, shape.q_len) for b in (bs.block_q, bs.block_q_dkv, bs.block_q_dq))
  q_pad = pl.cdiv(shape.q_len, q_block) * q_block
  kv_block = max(
      clamp(b, shape.kv_len) for b in (bs.block_k, bs.block_k_dkv, bs.block_k_dq))
  kv_pad = pl.cdiv(shape.kv_len, kv_block) * kv_block

  qp = _pad_axis(_pad_axis(q, 3, head_pad), 1, q_pad)
  kp = _pad_axis(_pad_axis(k, 3, head_pad), 1, kv_pad)
  vp = _pad_axis(_pad_axis(v, 3, head_pad), 1, kv_pad)
  if segments is not None:
    q_segments, kv_segments = segments
    segments = (
        _pad_axis(q_segments, 1, q_pad),
        _pad_axis(kv_segments, 1, kv_pad, value=masking.PAD_SEGMENT),
    )
  out = _flash(qp, kp, vp, segments, st)
  return out[:, : shape.q_len, :, : shape.head_dim]
