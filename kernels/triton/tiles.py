"""The bodies of the Pallas attention kernels: one program's work on its tiles.

`kernels.triton.attention` launches them (grids, BlockSpecs, padding, the
custom VJP) and describes the algorithm. Every variant of `kernels.variants`
enters here through `TritonStatic.var` and Python `if`s, so a kernel without a
variant traces to exactly the IR it had before variants existed (the sm_90
inspection, `fusedlm inspect triton`, shows the same registers, spills
and cp.async for the plain kernels).

Optional inputs follow the main ones in a fixed order, each present only when
its variant is: q segment ids, kv segment ids, block range (segments); bias;
mask (int8, nonzero = attend); seed ([2] uint32, dropout).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fusedlm.kernels import variants
from fusedlm.kernels.tiling import LOG2E
from fusedlm.kernels.triton.block_sizes import BlockSizes


@dataclasses.dataclass(frozen=True)
class TritonStatic:
  """Everything the kernels specialise on (hashable: a custom_vjp nondiff arg)."""

  scale: float
  causal: bool
  q_len: int  # unpadded lengths: they fix the diagonal and the tails
  kv_len: int
  group: int
  has_segments: bool
  blocks: BlockSizes
  interpret: bool
  offset: int  # query i sits at key position i + offset
  var: variants.Variants = variants.Variants()

  @property
  def scale_log2(self) -> float:
    return self.scale * LOG2E


def dot(a, b, contract_a: int, contract_b: int):
  """a . b contracting one axis each, accumulating in float32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(
      a, b, (((contract_a,), (contract_b,)), ((), ())),
      precision=precision, preferred_element_type=jnp.float32,
  )


def unpack(refs, st: TritonStatic, num_outputs: int, block_range: bool = True):
  """Splits a kernel's trailing refs into (optional inputs by name, outputs)."""
  refs = list(refs)
  outputs, inputs = refs[len(refs) - num_outputs:], refs[:len(refs) - num_outputs]
  named = {}
  if st.has_segments:
    named["q_seg"], named["kv_seg"] = inputs.pop(0), inputs.pop(0)
    if block_range:
      named["range"] = inputs.pop(0)
  if st.var.bias is not None:
    named["bias"] = inputs.pop(0)
  if st.var.mask is not None:
    named["mask"] = inputs.pop(0)
  if st.var.dropout_rate > 0.0:
    named["seed"] = inputs.pop(0)
  assert not inputs, inputs
  return named, outputs


def _visible(q_pos, k_pos, q_segments, kv_segments, mask, block_k: int,
             st: TritonStatic):
  """Which (query, key) pairs of a tile may attend, or None if all may.

  Positions, segment ids and the mask tile come shaped to broadcast against
  each other: [block_q, 1] against [1, block_k] for a tile of S, or the
  transpose for a tile of S^T (the dK/dV kernel).
  """
  visible = None

  def both(new):
    return new if visible is None else visible & new

  if st.causal:
    visible = k_pos <= q_pos + st.offset
  if st.has_segments:
    # Padded keys carry PAD_SEGMENT, so this also hides the padded tail.
    visible = both(q_segments == kv_segments)
  elif st.kv_len % block_k:
    visible = both(k_pos < st.kv_len)
  if st.var.window is not None:
    left, right = st.var.window
    if left is not None:
      visible = both(k_pos >= q_pos + (st.offset - left))
    if right is not None:
      visible = both(k_pos <= q_pos + (st.offset + right))
  if mask is not None:
    visible = both(mask != 0)
  return visible


def _logits(s, bias, st: TritonStatic):
  """Scaled (biased, capped) logits in log2 units, and d capped / d uncapped.

  The plain kernel multiplies once (scale * log2 e); only variants add steps.
  """
  if st.var.bias is None and st.var.soft_cap is None:
    return s * st.scale_log2, None
  s = s * st.scale
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  cap_grad = None
  if st.var.soft_cap is not None:
    t = jnp.tanh(s / st.var.soft_cap)
    s = st.var.soft_cap * t
    cap_grad = 1.0 - t * t
  return s * LOG2E, cap_grad


def scores(q, k, q_start, k_start, q_segments, kv_segments, bias, mask,
           st: TritonStatic):
  """S * log2(e) of one tile, [block_q, block_k] float32, -inf where hidden.

  Also returns the soft-cap derivative (None without a cap).
  """
  s, cap_grad = _logits(dot(q, k, 1, 1), bias, st)
  block_q, block_k = s.shape
  visible = _visible(
      q_start + jnp.arange(block_q)[:, None], k_start + jnp.arange(block_k)[None, :],
      None if q_segments is None else q_segments[:, None],
      None if kv_segments is None else kv_segments[None, :], mask, block_k, st)
  return (s if visible is None else jnp.where(visible, s, -jnp.inf)), cap_grad


def scores_t(k, q, k_start, q_start, kv_segments, q_segments, bias_t, mask_t,
             st: TritonStatic):
  """S^T * log2(e) of one tile, [block_k, block_q]: keys are the rows.

  The dK/dV kernel's products all have block_k rows this way (K Q^T, V dO^T,
  dS^T Q, P^T dO), so with block_k >= 64 every one of them can be a Hopper
  wgmma, whose M (rows) must be a multiple of 64.
  """
  s, cap_grad = _logits(dot(k, q, 1, 1), bias_t, st)
  block_k, block_q = s.shape
  visible = _visible(
      q_start + jnp.arange(block_q)[None, :], k_start + jnp.arange(block_k)[:, None],
      None if q_segments is None else q_segments[None, :],
      None if kv_segments is None else kv_segments[:, None], mask_t, block_k, st)
  return (s if visible is None else jnp.where(visible, s, -jnp.inf)), cap_grad


def _dropout(named, batch, head, rows, cols, st: TritonStatic):
  """The dropout factor of a tile (0 or 1/(1-rate)), or None without dropout."""
  if st.var.dropout_rate == 0.0:
    return None
  seed = (named["seed"][0], named["seed"][1])
  return variants.dropout_scale(seed, batch, head, rows, cols,
                                st.var.dropout_rate)


def _batch_and_head(st: TritonStatic):
  """The (batch, head) of this program on an (i, b, h) grid, for dropout only.

  Read outside the key loop: Pallas' interpreter gives program ids to the
  kernel's top level only.
  """
  return (pl.program_id(1), pl.program_id(2)) if st.var.dropout_rate > 0.0 else None


def _dropout_tile(named, ids, q_start, k_start, block_q, block_k, st: TritonStatic):
  """The dropout factor of a [block_q, block_k] tile of the (i, b, h) grid."""
  return _dropout(named, ids[0], ids[1],
                  q_start + jnp.arange(block_q)[:, None],
                  k_start + jnp.arange(block_k)[None, :], st)


def _div_floor(x, n: int):
  """floor(max(x, 0) / n) for traced ints."""
  return lax.div(jnp.maximum(x, 0), n)


def _right_reach(st: TritonStatic):
  """Keys visible to the right of the diagonal (None: unbounded)."""
  right = 0 if st.causal else None
  if st.var.window is not None and st.var.window[1] is not None:
    right = st.var.window[1] if right is None else min(right, st.var.window[1])
  return right


def kv_block_bounds(q_start, block_q: int, block_k: int, st: TritonStatic):
  """[lower, upper) of the key blocks any of these query rows can see.

  lower stays the Python int 0 unless a window bounds it, so that the plain
  kernels trace as they always have.
  """
  last = pl.cdiv(st.kv_len, block_k)
  lower, upper = 0, last
  right = _right_reach(st)
  if right is not None:
    # ceil((q_start + block_q + offset + right) / block_k), clamped to [0, last].
    visible_end = q_start + block_q + (st.offset + right)
    upper = lax.div(jnp.maximum(visible_end, 0) + block_k - 1, block_k)
    upper = jnp.minimum(upper, last)
  if st.var.window is not None and st.var.window[0] is not None:
    lower = _div_floor(q_start + (st.offset - st.var.window[0]), block_k)
  return lower, upper


def _with_range(bounds, named, st: TritonStatic):
  """Narrows [lower, upper) to the block range of the segment ids."""
  lower, upper = bounds
  if not st.has_segments:
    return lower, upper
  first, end = named["range"][0], named["range"][1]
  lower = first if isinstance(lower, int) and lower == 0 else jnp.maximum(lower, first)
  return lower, jnp.minimum(upper, end)


def q_block_bounds(k_start, block_q: int, block_k: int, st: TritonStatic):
  """[lower, upper) of the query blocks whose rows can see any of these keys."""
  lower, upper = 0, pl.cdiv(st.q_len, block_q)
  right = _right_reach(st)
  if right is not None:
    # First query row that sees key k_start is k_start - offset - right.
    lower = _div_floor(k_start - (st.offset + right), block_q)
  if st.var.window is not None and st.var.window[0] is not None:
    last_row = k_start + (block_k - 1 - st.offset + st.var.window[0])
    upper = jnp.minimum(_div_floor(last_row + block_q, block_q), upper)
  return lower, upper


def fwd_kernel(q_ref, k_ref, v_ref, *refs, st: TritonStatic, block_q, block_k):
  # q_ref [block_q, d]; k_ref [kv_pad, d]; v_ref [kv_pad, dv]; o_ref
  # [block_q, dv]; lse_ref [block_q]; with segments: q_seg [block_q], kv_seg
  # [kv_pad], range [2] (the key blocks these rows' segments meet); bias,
  # mask [block_q, kv_pad].
  named, (o_ref, lse_ref) = unpack(refs, st, 2)
  q_start = pl.program_id(0) * block_q
  ids = _batch_and_head(st)
  q = q_ref[...]
  q_segments = named["q_seg"][...] if st.has_segments else None

  def body(j, carry):
    acc, m_prev, l_prev = carry
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    kv_segments = (named["kv_seg"][pl.ds(k_start, block_k)]
                   if st.has_segments else None)
    bias = named["bias"][:, pl.ds(k_start, block_k)] if "bias" in named else None
    mask = named["mask"][:, pl.ds(k_start, block_k)] if "mask" in named else None
    s, _ = scores(q, k, q_start, k_start, q_segments, kv_segments, bias, mask, st)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # A row that has seen only hidden keys keeps m = -inf; shift it by 0
    # instead so exp2 gives 0, not NaN.
    m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp2(s - m_shift[:, None])
    correction = jnp.exp2(m_prev - m_shift)
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    if st.var.dropout_rate > 0.0:
      # Dropout scales P after its row sum: the softmax is of the whole row.
      p = p * _dropout_tile(named, ids, q_start, k_start, block_q, block_k, st)
    acc = acc * correction[:, None] + dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_next, l_next

  carry = (
      jnp.zeros(o_ref.shape, jnp.float32),
      jnp.full((block_q,), -jnp.inf, jnp.float32),
      jnp.zeros((block_q,), jnp.float32),
  )
  lower, upper = _with_range(kv_block_bounds(q_start, block_q, block_k, st),
                             named, st)
  acc, m, l = lax.fori_loop(lower, upper, body, carry)
  # Final rescaling (FlashAttention-2, Algorithm 1, line 12); empty rows -> 0.
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  # L = +inf on empty rows makes every recomputed P exactly 0 there.
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               st: TritonStatic, block_q, block_k):
  # q_ref [q_pad, group, d]; do_ref [q_pad, group, dv]; lse_ref, delta_ref
  # [group, q_pad]; k_ref, dk_ref [block_k, d]; v_ref, dv_ref [block_k, dv];
  # with segments: q_seg [q_pad], kv_seg [block_k], range [2] (query blocks
  # they meet); bias, mask [group, q_pad, block_k] (per head) or [q_pad,
  # block_k]. Works on transposed tiles (S^T, P^T, dP^T, dS^T: [block_k,
  # block_q]), so that every product has block_k rows (see scores_t).
  named, (dk_ref, dv_ref) = unpack(refs, st, 2)
  k_start = pl.program_id(0) * block_k
  ids = _batch_and_head(st)  # (batch, kv head) on this grid
  k = k_ref[...]
  v = v_ref[...]
  kv_segments = named["kv_seg"][...] if st.has_segments else None

  lower, upper = q_block_bounds(k_start, block_q, block_k, st)
  if st.has_segments:
    lower = jnp.maximum(lower, named["range"][0])
    upper = jnp.minimum(upper, named["range"][1])

  def tile_t(name, g, q_start):
    """The bias or mask tile of query head g, transposed: [block_k, block_q]."""
    if name not in named:
      return None
    layout = st.var.bias if name == "bias" else st.var.mask
    ref = named[name]
    tile = (ref[g, pl.ds(q_start, block_q), :] if layout[1]
            else ref[pl.ds(q_start, block_q), :])
    return tile.T

  def over_q_blocks(g, carry):
    def body(i, carry):
      dk, dv = carry
      q_start = i * block_q
      q = q_ref[pl.ds(q_start, block_q), g, :]
      do = do_ref[pl.ds(q_start, block_q), g, :]
      lse = lse_ref[g, pl.ds(q_start, block_q)]
      delta = delta_ref[g, pl.ds(q_start, block_q)]
      q_segments = (named["q_seg"][pl.ds(q_start, block_q)]
                    if st.has_segments else None)
      s_t, cap_grad_t = scores_t(k, q, k_start, q_start, kv_segments, q_segments,
                                 tile_t("bias", g, q_start),
                                 tile_t("mask", g, q_start), st)
      p_t = jnp.exp2(s_t - lse[None, :])  # [block_k, block_q]
      keep_t = None
      if st.var.dropout_rate > 0.0:
        keep_t = _dropout(named, ids[0], ids[1] * st.group + g,
                          q_start + jnp.arange(block_q)[None, :],
                          k_start + jnp.arange(block_k)[:, None], st)
      if keep_t is None:
        dv = dv + dot(p_t.astype(do.dtype), do, 1, 0)
        dp_t = dot(v, do, 1, 1)
      else:
        dv = dv + dot((p_t * keep_t).astype(do.dtype), do, 1, 0)
        dp_t = dot(v, do, 1, 1) * keep_t
      ds_t = p_t * (dp_t - delta[None, :])
      if cap_grad_t is not None:
        ds_t = ds_t * cap_grad_t
      dk = dk + dot(ds_t.astype(q.dtype), q, 1, 0)
      return dk, dv

    return lax.fori_loop(lower, upper, body, carry)

  zeros = (jnp.zeros(dk_ref.shape, jnp.float32),
           jnp.zeros(dv_ref.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, st.group, over_q_blocks, zeros)
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _ds(q, do, k, v, lse, delta, q_start, k_start, q_segments, kv_segments,
        bias, mask, keep, st: TritonStatic):
  """dS of one [block_q, block_k] tile: d loss / d (scaled, biased) logits."""
  s, cap_grad = scores(q, k, q_start, k_start, q_segments, kv_segments, bias,
                       mask, st)
  p = jnp.exp2(s - lse[:, None])
  dp = dot(do, v, 1, 1)
  if keep is not None:
    dp = dp * keep
  ds = p * (dp - delta[:, None])
  return ds if cap_grad is None else ds * cap_grad


def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
              st: TritonStatic, block_q, block_k):
  # q_ref, dq_ref [block_q, d]; do_ref [block_q, dv]; k_ref [kv_pad, d];
  # v_ref [kv_pad, dv]; lse_ref, delta_ref [block_q]; with segments: q_seg
  # [block_q], kv_seg [kv_pad], range [2] (key blocks these rows' segments
  # meet); bias, mask [block_q, kv_pad].
  named, (dq_ref,) = unpack(refs, st, 1)
  q_start = pl.program_id(0) * block_q
  ids = _batch_and_head(st)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_segments = named["q_seg"][...] if st.has_segments else None

  def body(j, dq):
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    kv_segments = (named["kv_seg"][pl.ds(k_start, block_k)]
                   if st.has_segments else None)
    bias = named["bias"][:, pl.ds(k_start, block_k)] if "bias" in named else None
    mask = named["mask"][:, pl.ds(k_start, block_k)] if "mask" in named else None
    keep = (_dropout_tile(named, ids, q_start, k_start, block_q, block_k, st)
            if st.var.dropout_rate > 0.0 else None)
    ds = _ds(q, do, k, v, lse, delta, q_start, k_start, q_segments, kv_segments,
             bias, mask, keep, st)
    return dq + dot(ds.astype(k.dtype), k, 1, 0)

  lower, upper = _with_range(kv_block_bounds(q_start, block_q, block_k, st),
                             named, st)
  dq = lax.fori_loop(lower, upper, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def dbias_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                 st: TritonStatic, num_heads: int):
  # One [block_q, block_k] tile of dS per program, grid (q blocks, k blocks,
  # batch * heads): q_ref [block_q, d]; do_ref [block_q, dv]; k_ref
  # [block_k, d]; v_ref [block_k, dv]; lse_ref, delta_ref [block_q]; with
  # segments: q_seg [block_q], kv_seg [block_k]; bias, mask, ds_ref
  # [block_q, block_k].
  named, (ds_ref,) = unpack(refs, st, 1, block_range=False)
  block_q, block_k = ds_ref.shape
  q_start, k_start = pl.program_id(0) * block_q, pl.program_id(1) * block_k
  batch_head = pl.program_id(2)
  keep = _dropout(named, batch_head // num_heads, batch_head % num_heads,
                  q_start + jnp.arange(block_q)[:, None],
                  k_start + jnp.arange(block_k)[None, :], st)
  ds = _ds(q_ref[...], do_ref[...], k_ref[...], v_ref[...], lse_ref[...],
           delta_ref[...], q_start, k_start,
           named["q_seg"][...] if st.has_segments else None,
           named["kv_seg"][...] if st.has_segments else None,
           named["bias"][...], named["mask"][...] if "mask" in named else None,
           keep, st)
  ds_ref[...] = ds
