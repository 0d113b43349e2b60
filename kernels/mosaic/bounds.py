"""Which tiles each Mosaic GPU kernel visits: loop bounds from the causal diagonal, window and tails.

A CTA streams the tiles of the other side in one range [lo, hi), split in
three loops so that only tiles a mask edge cuts pay for `where`:

  masked [lo, a)    tiles the leading edge cuts (or every tile, with segment
                    ids, which may cut anywhere);
  whole  [a, b)     tiles every row of the CTA sees entirely;
  masked [b, hi)    tiles the trailing edge cuts.

The forward and dQ kernels walk key tiles for a block of query rows: their
leading edge is the window's left side, the trailing one the causal diagonal
(or the window's right side) and the padded keys. The dK/dV kernel walks
query tiles for a block of keys: the leading edge is the diagonal (query i
sees key j from row j - offset - right on), the trailing one the window's
left side. `Range.lead` / `Range.trail` say, at trace time, whether a
masked loop can be non-empty, so the plain kernels emit only the loops they
always had. Every bound is a traced int32 scalar.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fusedlm.kernels.mosaic.tiles import MosaicStatic


@dataclasses.dataclass(frozen=True)
class Range:
  """[lo, hi) of the streamed tiles, [a, b) the whole ones inside it."""

  lo: Any
  a: Any
  b: Any
  hi: Any
  lead: bool  # whether [lo, a) can hold a tile (trace-time)
  trail: bool  # whether [b, hi) can

  @property
  def steps(self):
    return self.hi - self.lo


def _floor_div(x, n: int):
  """floor(max(x, 0) / n): every bound is clipped at 0 anyway."""
  return lax.div(jnp.maximum(x, 0), jnp.int32(n))


def _ceil_div(x, n: int):
  return lax.div(jnp.maximum(x, 0) + (n - 1), jnp.int32(n))


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def right_reach(st: MosaicStatic) -> int | None:
  """Keys a query sees right of its diagonal position (None: unbounded)."""
  right = 0 if st.causal else None
  window = st.var.window
  if window is not None and window[1] is not None:
    right = window[1] if right is None else min(right, window[1])
  return right


def left_reach(st: MosaicStatic) -> int | None:
  """Keys a query sees left of its diagonal position (None: unbounded)."""
  return None if st.var.window is None else st.var.window[0]


def masked_tail(st: MosaicStatic, block_kv: int) -> bool:
  """Whether some real row may see a padded key of the last tile.

  Bottom-right causal never does (j <= i + offset < kv_len); padded rows are
  sliced away, so only the rows that exist count.
  """
  if st.kv_len % block_kv == 0:
    return False
  right = right_reach(st)
  return right is None or st.q_len - 1 + st.offset + right >= st.kv_len


def kv_range(st: MosaicStatic, q_first, q_rows: int, block_kv: int) -> Range:
  """Key tiles of the CTA of query rows [q_first, q_first + q_rows)."""
  num_kv = pl.cdiv(st.kv_len, block_kv)
  right, left = right_reach(st), left_reach(st)
  last_row = q_first + q_rows - 1
  if right is None:
    hi = jnp.int32(num_kv)
    b = jnp.int32(st.kv_len // block_kv)
  else:
    hi = _clip(_ceil_div(last_row + 1 + st.offset + right, block_kv), 0, num_kv)
    # Tile j is whole for the first row iff its last key <= q_first + offset + right.
    b = jnp.minimum(_floor_div(q_first + st.offset + right + 1, block_kv),
                    st.kv_len // block_kv)
  if left is None:
    lo = a = jnp.int32(0)
  else:
    lo = jnp.minimum(_floor_div(q_first + st.offset - left, block_kv), hi)
    a = _clip(_ceil_div(last_row + st.offset - left, block_kv), lo, hi)
  b = _clip(b, a, hi)
  if st.has_segments:
    a = b = hi
  # A CTA of padded rows only (q_pad rounds up to the largest tile) is sliced
  # away: it streams nothing.
  hi = jnp.where(q_first < st.q_len, hi, lo)
  a, b = jnp.minimum(a, hi), jnp.minimum(b, hi)
  return Range(lo, a, b, hi, lead=left is not None or st.has_segments,
               trail=(right is not None or masked_tail(st, block_kv))
               and not st.has_segments)


def q_range(st: MosaicStatic, kv_first, kv_rows: int, block_q: int) -> Range:
  """Query tiles (per head) of the CTA of keys [kv_first, kv_first + kv_rows).

  Query rows of the padded tail need no mask here: their dO and D are zero,
  so they add nothing to dK and dV.
  """
  end = pl.cdiv(st.q_len, block_q)
  right, left = right_reach(st), left_reach(st)
  last_key = kv_first + kv_rows - 1
  if right is None:
    lo = a = jnp.int32(0)
  else:
    # Query i sees key j from i = j - offset - right on.
    lo = jnp.minimum(_floor_div(kv_first - st.offset - right, block_q), end)
    a = _clip(_ceil_div(last_key - st.offset - right, block_q), lo, end)
  if left is None:
    hi = b = jnp.int32(end)
  else:
    # ... up to i = j - offset + left.
    hi = _clip(_ceil_div(last_key - st.offset + left + 1, block_q), lo, end)
    b = _floor_div(kv_first - st.offset + left + 1, block_q)
  a = jnp.minimum(a, hi)
  b = _clip(b, a, hi)
  if st.has_segments:
    a = b = hi
  # A CTA of padded keys only is sliced away.
  hi = jnp.where(kv_first < st.kv_len, hi, lo)
  a, b = jnp.minimum(a, hi), jnp.minimum(b, hi)
  return Range(lo, a, b, hi, lead=right is not None or st.has_segments,
               trail=left is not None and not st.has_segments)
