"""What the three TPU kernels share: static settings, block ranges, tile masks.

Block skipping. Every kernel walks a full grid whose innermost axis streams
blocks of the other side (keys in the forward and dQ kernels, query blocks
in the dK/dV kernel). For each block that owns a program, the blocks it can
see form one interval [first, end): `kv_block_ranges` / `q_block_ranges`
compute it in XLA from the causal diagonal, the local window and the real
lengths (static) intersected with the segment ids' reach
(`masking.segment_block_ranges`, traced). The kernels get it as a scalar
prefetch (SMEM, read before the grid runs), run a step only inside it
(`pl.when`) and clamp their index maps into it, so a skipped step fetches
nothing new: its block index repeats the previous one and Pallas' pipeline
elides the copy. Inside the interval, only blocks that straddle a mask edge
pay for the [block_q, block_k] iotas and `where` (`needs_mask`).

Score tiles are [block_q, block_k] (queries on sublanes, keys on lanes) in
every kernel; row statistics (m, l, the log-sum-exp L, D = rowsum(dO O)) are
kept lane-broadcast ([rows, LANES] in VMEM scratch, [rows, ROW_LANES] in HBM)
and read as [rows, 1] columns, as the vector unit wants them. Segment ids
arrive lane-broadcast for queries ([rows, ROW_LANES]) and sublane-broadcast
for keys ([SUBLANES, keys]).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusedlm.kernels import masking, variants
from fusedlm.kernels.tpu.block_sizes import TpuBlockSizes


@dataclasses.dataclass(frozen=True)
class TpuStatic:
  """Everything a call specialises the kernels on (hashable: a custom_vjp
  nondiff argument)."""

  scale: float
  causal: bool
  q_len: int  # unpadded lengths: they fix the diagonal and the tails
  kv_len: int
  group: int  # query heads per K/V head
  has_segments: bool
  blocks: TpuBlockSizes  # as given; the kernels use the clamped `tiles`
  tiles: tuple[tuple[int, int], ...]  # (block_q, block_k): forward, dq, dkv
  interpret: bool
  offset: int  # query i sits at key position i + offset
  var: variants.Variants = variants.Variants()

  @property
  def right_reach(self) -> int | None:
    """Keys visible right of the diagonal (None: unbounded)."""
    right = 0 if self.causal else None
    if self.var.window is not None and self.var.window[1] is not None:
      right = self.var.window[1] if right is None else min(right, self.var.window[1])
    return right

  @property
  def left_reach(self) -> int | None:
    """Keys visible left of the diagonal (None: unbounded)."""
    return None if self.var.window is None else self.var.window[0]

  @property
  def dynamic_mask(self) -> bool:
    """Masks read from arrays (segment ids, the per-head mask): every
    visited tile applies them."""
    return self.has_segments or self.var.mask is not None


def dot(a, b, contract_a: int, contract_b: int):
  """a . b contracting one axis each, on the MXU with float32 accumulation
  (float32 inputs at full precision, not bfloat16 passes)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def _intervals(first, end, num_blocks: int):
  """[first, end) as [n, 2] int32 with empty intervals as [0, 0) (clamping
  an index map into [first, max(first, end - 1)] then stays in bounds)."""
  empty = end <= first
  first = np.where(empty, 0, np.clip(first, 0, num_blocks))
  end = np.where(empty, 0, np.clip(end, 0, num_blocks))
  return np.stack([first, end], axis=-1).astype(np.int32)


def kv_block_ranges(st: TpuStatic, block_q: int, block_k: int, q_pad: int,
                    kv_pad: int, segments=None):
  """[first, end) of the key blocks each query block can see.

  Returns int32 [batch (1 without segments) * q_blocks * 2], flat for SMEM.
  segments: the padded (q_ids [b, q_pad], kv_ids [b, kv_pad]) or None.
  """
  rows = np.arange(q_pad // block_q) * block_q
  last_row = np.minimum(rows + block_q, st.q_len) - 1
  lo_key = np.zeros_like(rows)
  hi_key = np.full_like(rows, st.kv_len)  # exclusive
  if st.right_reach is not None:
    hi_key = np.minimum(hi_key, last_row + st.offset + st.right_reach + 1)
  if st.left_reach is not None:
    lo_key = np.maximum(lo_key, rows + st.offset - st.left_reach)
  hi_key = np.where(rows < st.q_len, hi_key, 0)  # blocks of padded rows only
  ranges = jnp.asarray(_intervals(lo_key // block_k, -(-hi_key // block_k),
                                  kv_pad // block_k))[None]
  if segments is not None:
    seg_range, _ = masking.segment_block_ranges(*segments, block_q, block_k)
    ranges = _intersect(ranges, seg_range)
  return ranges.reshape(-1)


def q_block_ranges(st: TpuStatic, block_q: int, block_k: int, q_pad: int,
                   kv_pad: int, segments=None):
  """[first, end) of the query blocks that can see each key block.

  Returns int32 [batch (1 without segments) * kv_blocks * 2], flat for SMEM.
  """
  keys = np.arange(kv_pad // block_k) * block_k
  last_key = np.minimum(keys + block_k, st.kv_len) - 1
  lo_row = np.zeros_like(keys)
  hi_row = np.full_like(keys, st.q_len)
  # Query r sees key c iff c - offset - right <= r <= c - offset + left.
  if st.right_reach is not None:
    lo_row = np.maximum(lo_row, keys - st.offset - st.right_reach)
  if st.left_reach is not None:
    hi_row = np.minimum(hi_row, last_key - st.offset + st.left_reach + 1)
  hi_row = np.where(keys < st.kv_len, hi_row, 0)
  ranges = jnp.asarray(_intervals(lo_row // block_q, -(-hi_row // block_q),
                                  q_pad // block_q))[None]
  if segments is not None:
    _, seg_range = masking.segment_block_ranges(*segments, block_q, block_k)
    ranges = _intersect(ranges, seg_range)
  return ranges.reshape(-1)


def _intersect(static, traced):
  """Two [.., n, 2] interval arrays intersected; empty ones become [0, 0)."""
  first = jnp.maximum(static[..., 0], traced[..., 0])
  end = jnp.minimum(static[..., 1], traced[..., 1])
  empty = end <= first
  return jnp.stack([jnp.where(empty, 0, first), jnp.where(empty, 0, end)],
                   axis=-1).astype(jnp.int32)


def block_range(ranges_ref, batch, block, num_blocks: int, st: TpuStatic):
  """(first, end) of one owning block, read from the prefetched ranges."""
  row = (batch if st.has_segments else 0) * num_blocks + block
  return ranges_ref[2 * row], ranges_ref[2 * row + 1]


def div(x, n: int):
  """x // n for traced non-negative int32 (truncating: no sign fix-up code)."""
  return lax.div(x, jnp.int32(n))


def rem(x, n: int):
  """x % n for traced non-negative int32."""
  return lax.rem(x, jnp.int32(n))


def clamp_index(j, first, end):
  """j clamped into [first, end - 1] (first on an empty range)."""
  return jnp.minimum(jnp.maximum(j, first), jnp.maximum(first, end - 1))


def needs_mask(q_start, k_start, block_q: int, block_k: int, st: TpuStatic):
  """Whether a tile straddles a mask edge (traced bool), or a Python bool.

  False when every pair of the tile is visible by position: then the masked
  step's iotas and `where` are skipped. Dynamic masks need every tile.
  """
  if st.dynamic_mask:
    return True
  cond = False

  def either(c):
    return c if cond is False else cond | c

  if st.right_reach is not None:
    # The first row's rightmost visible key must cover the tile's last key.
    cond = either(k_start + block_k - 1 > q_start + st.offset + st.right_reach)
  if st.left_reach is not None:
    cond = either(k_start < q_start + block_q - 1 + st.offset - st.left_reach)
  if st.kv_len % block_k:
    cond = either(k_start + block_k > st.kv_len)
  return cond


def visible(q_start, k_start, shape, q_ids, kv_ids, mask, st: TpuStatic):
  """[block_q, block_k] bool of the pairs that may attend.

  q_ids [block_q, 1], kv_ids [1, block_k] (None without segments); mask: the
  per-head mask tile (int8, nonzero = attend) or None.
  """
  rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  ok = jnp.ones(shape, jnp.bool_)
  if st.right_reach is not None:
    ok = ok & (cols <= rows + (st.offset + st.right_reach))
  if st.left_reach is not None:
    ok = ok & (cols >= rows + (st.offset - st.left_reach))
  if q_ids is not None:
    # Padded keys carry PAD_SEGMENT, so this also hides the padded tail.
    ok = ok & (q_ids == kv_ids)
  elif st.kv_len % shape[1]:
    ok = ok & (cols < st.kv_len)
  if mask is not None:
    ok = ok & (mask != 0)
  return ok


def logits(s, bias, st: TpuStatic):
  """scale * q.k (+ bias, soft-capped), and d capped / d uncapped (None
  without a cap). s: the raw [block_q, block_k] float32 product."""
  s = s * st.scale
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  if st.var.soft_cap is None:
    return s, None
  t = jnp.tanh(s / st.var.soft_cap)
  return st.var.soft_cap * t, 1.0 - t * t


def dropout_tile(seed_ref, batch, head, q_start, k_start, shape, st: TpuStatic):
  """The tile's dropout factor (0 or 1/(1-rate)), or None without dropout.

  The bits are those of `variants.dropout_scale` for (batch, head, row,
  column), so the reference and the GPU kernels drop the same entries.
  """
  if st.var.dropout_rate == 0.0:
    return None
  rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  seed = (seed_ref[0], seed_ref[1])
  return variants.dropout_scale(seed, batch, head, rows, cols,
                                st.var.dropout_rate)


def column(x):
  """The first lane of a lane-broadcast [rows, lanes] statistic: [rows, 1]."""
  return x[:, :1]


def lanes(col, width: int):
  """A [rows, 1] column broadcast to [rows, width]."""
  return jnp.broadcast_to(col, (col.shape[0], width))


def seed_array(dropout_rng):
  """The Philox key as int32 [2] (SMEM holds 32-bit ints; the kernel's
  uint32 conversion keeps the bits)."""
  return jax.lax.bitcast_convert_type(variants.seed_words(dropout_rng), jnp.int32)
