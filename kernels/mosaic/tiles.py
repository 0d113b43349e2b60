"""What the Mosaic GPU attention kernels share: their tiles, static settings and masks.

`kernels.mosaic.forward` and `kernels.mosaic.backward` hold the kernels,
`kernels.mosaic.attention` the differentiable entry point and the design.
Shapes are named per helper; a tile is [rows, cols] float32 in the WGMMA
layout of one consumer warpgroup (64 rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fusedlm.kernels.tiling import LOG2E, is_power_of_two

# dK and dV accumulators of a 64-key block at head dim d take d registers a
# thread together (2 x 64 x d float32 over 128 threads); past 128 they do not
# fit a consumer's 240 beside the tiles, and the dQ kernel's shared memory
# passes 227 KiB. Head dim 256 needs the accumulators split over the head
# dim: not built; 'pallas' takes it.
MAX_HEAD_DIM = 128
HEAD_DIM_QUANTUM = 64  # 64 16-bit elements: one 128-byte swizzled row.
COMPUTE_WARPGROUPS = 2
# setmaxnreg's split of the 65536 registers over 3 x 128 threads: 240 for each
# consumer, 24 for the producer (upstream's 232 / 40 left the dK/dV kernel
# spilling at head dim 128).
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 240
# The kernels' grid and warpgroup axes. Mosaic GPU resolves lax.axis_index
# against the enclosing JAX mesh (pmap's or shard_map's axes) before the
# kernel's own grid: a grid axis named like a mesh axis ("batch" is the
# trainer's pmap axis) would read the device index instead, which also makes
# the kernel a multi-device one that XLA links against NVSHMEM ("NVSHMEM is
# not supported in XLA" at run time). Names no mesh uses avoid both.
BATCH_AXIS = "fusedlm_mosaic_batch"
HEAD_AXIS = "fusedlm_mosaic_heads"
Q_AXIS = "fusedlm_mosaic_q_blocks"
KV_AXIS = "fusedlm_mosaic_kv_blocks"
WARPGROUP_AXIS = "fusedlm_mosaic_warpgroup"


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
  """Tiles and ring depths of the three Mosaic GPU kernels.

  block_q: query rows of each consumer warpgroup in the forward (a CTA owns
    2 * block_q); block_kv: keys per streamed K/V tile; num_stages: slots
    in the forward's K/V ring. *_dq: the dQ kernel's (a CTA owns 2 *
    block_q_dq rows); *_dkv: the dK/dV kernel's (a CTA owns 2 * block_kv_dkv
    keys and streams block_q_dkv query rows a step); num_stages_bwd: both
    backward rings. Each is a power of two and a multiple of 64: a
    warpgroup's wgmma has M = 64 rows, and the tiles are 64-row swizzled.
  """

  block_q: int = 64
  block_kv: int = 128
  num_stages: int = 2
  block_q_dq: int = 64
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  num_stages_bwd: int = 2

  def __post_init__(self):
    for field in ("block_q", "block_kv", "block_q_dq", "block_kv_dq",
                  "block_q_dkv", "block_kv_dkv"):
      value = getattr(self, field)
      if not isinstance(value, int) or not is_power_of_two(value) or value < 64:
        raise ValueError(
            f"MosaicBlockSizes.{field} must be a power of two of at least 64"
            f" (a warpgroup's wgmma tile), got {value!r}.")
      if value > 256:
        raise ValueError(
            f"MosaicBlockSizes.{field} must be at most 256 (wgmma's N and one"
            f" TMA box), got {value}.")
    for field in ("num_stages", "num_stages_bwd"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 2:
        raise ValueError(
            f"MosaicBlockSizes.{field} must be an int of at least 2 (a ring"
            f" that overlaps loads with products), got {value!r}.")

  @classmethod
  def get_default(cls, head_dim: int) -> "MosaicBlockSizes":
    """The table (head dims 64 and 128): the defaults, compiled without
    spills for sm_90a (`fusedlm inspect mosaic`); not yet tuned
    on a GPU."""
    del head_dim
    return cls()

  def smem_bytes(self, head_dim: int, itemsize: int) -> dict[str, int]:
    """Shared memory of each kernel's scratch (tiles and row vectors)."""
    wgs = COMPUTE_WARPGROUPS
    tile = lambda rows: rows * head_dim * itemsize
    fwd = (wgs * tile(self.block_q)  # Q, reused for O
           + 2 * self.num_stages * tile(self.block_kv)  # K and V rings
           + wgs * self.block_q * 8  # L out, q segment ids
           + self.num_stages * self.block_kv * 4)  # kv segment ids
    dq = (2 * wgs * tile(self.block_q_dq)  # Q (reused for dQ), dO
          + 2 * self.num_stages_bwd * tile(self.block_kv_dq)
          + 3 * wgs * self.block_q_dq * 4
          + self.num_stages_bwd * self.block_kv_dq * 4)
    dkv = (2 * wgs * tile(self.block_kv_dkv)  # K, V (reused for dK, dV)
           + 2 * self.num_stages_bwd * tile(self.block_q_dkv)  # Q, dO rings
           + 3 * self.num_stages_bwd * self.block_q_dkv * 4  # L, D, q ids
           + wgs * self.block_kv_dkv * 4)
    return {"forward": fwd, "dq": dq, "dkv": dkv}


@dataclasses.dataclass(frozen=True)
class MosaicStatic:
  """Everything about a call that is fixed at trace time."""

  scale: float
  causal: bool
  q_len: int  # before padding
  kv_len: int
  group: int  # query heads per K/V head
  has_segments: bool
  blocks: MosaicBlockSizes
  interpret: Any  # False or a plgpu.InterpretGPUParams

  @property
  def offset(self) -> int:
    """Bottom-right causal: query i sees key j iff j <= i + offset."""
    return self.kv_len - self.q_len

  @property
  def score_scale(self) -> float:
    """Multiplier taking a raw q.k product to log2 units."""
    return self.scale * LOG2E


def launch(body, st: MosaicStatic, *, name: str, out_type, scratch_types, grid,
           grid_names):
  """The kernel `body` on `grid`, as every one of ours runs: one producer and
  COMPUTE_WARPGROUPS consumer warpgroups (axis WARPGROUP_AXIS), in the
  interpreter when st.interpret holds its parameters."""
  return plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=scratch_types,
      grid=grid,
      grid_names=grid_names,
      num_threads=COMPUTE_WARPGROUPS + 1,
      thread_name=WARPGROUP_AXIS,
      # approx_math: exp2 and the reciprocal through the fast MUFU paths, as
      # every FlashAttention kernel does (relative error ~2^-22).
      compiler_params=plgpu.CompilerParams(approx_math=True),
      kernel_name=name,
      interpret=st.interpret or None,
  )


def tile_transforms():
  # wgmma reads 64-element-wide swizzled tiles; TMA writes them that way.
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def row_vector(value: float, rows: int):
  return plgpu.layout_cast(jnp.full((rows,), value, jnp.float32),
                           plgpu.Layout.WGMMA.reduce(1))


def zeros_acc(rows: int, cols: int):
  return plgpu.layout_cast(jnp.zeros((rows, cols), jnp.float32),
                           plgpu.Layout.WGMMA)


def positions(start, shape, axis: int):
  """start + the index along `axis` of a [rows, cols] WGMMA tile, int32.

  Built as a vector (a thread holds 2 rows, or 16 columns of 64) and then
  broadcast, rather than as a full tile iota: the kernels that hold two
  accumulators have no registers for two [64, 64] int32 tiles.
  """
  layout = plgpu.Layout.WGMMA.reduce(1 - axis)
  vector = plgpu.broadcasted_iota(jnp.int32, (shape[axis],), 0, layout=layout)
  return lax.broadcast_in_dim(start + vector, shape, [axis])


def hide(st: MosaicStatic, s, q_first, kv_first, q_ids=None, kv_ids=None, *,
          q_axis: int, tail: bool):
  """The scores s of one tile with the pairs that may not attend at -inf.

  s: [rows, cols] float32 in the WGMMA layout, queries along `q_axis` (0;
  1 in the dK/dV kernel's transposed tiles), keys along the other, the
  tile's first query and key at q_first / kv_first. q_ids / kv_ids: the
  tile's segment id vectors (WGMMA.reduce(1 - axis) layouts), or None.
  Causal masking follows st.causal; tail: also hide padded keys. Positions
  are built only for the masks that need them: an unused iota has no layout
  for Mosaic's layout inference to find.
  """
  shape, kv_axis = s.shape, 1 - q_axis
  visible = None
  def both(mask):
    return mask if visible is None else visible & mask
  if st.causal or tail:
    keys = positions(kv_first, shape, kv_axis)
    if st.causal:
      visible = both(keys <= positions(q_first, shape, q_axis) + st.offset)
    if tail:
      visible = both(keys < st.kv_len)
  if q_ids is not None:
    visible = both(lax.broadcast_in_dim(q_ids, shape, [q_axis])
                   == lax.broadcast_in_dim(kv_ids, shape, [kv_axis]))
  return jnp.where(visible, s, -jnp.inf)


def kv_steps(st: MosaicStatic, q_first, q_rows: int, block_kv: int):
  """Key tiles a CTA of query rows [q_first, q_first + q_rows) streams.

  Returns (steps, unmasked): tiles [0, steps) are visible to some row, and
  tiles [0, unmasked) to every row, for causal and the padded tail (segment
  ids mask every tile). Both are traced int32 scalars.
  """
  num_kv = pl.cdiv(st.kv_len, block_kv)
  if not st.causal:
    steps = jnp.int32(num_kv)
    unmasked = jnp.int32(st.kv_len // block_kv)
  else:
    last_key = jnp.clip(q_first + q_rows + st.offset, 0, st.kv_len)
    steps = lax.div(last_key + block_kv - 1, jnp.int32(block_kv))
    # Tile j is whole for the first row iff its last key <= q_first + offset.
    whole = lax.div(jnp.maximum(q_first + st.offset + 1, 0), jnp.int32(block_kv))
    unmasked = jnp.minimum(whole, st.kv_len // block_kv)
    unmasked = jnp.minimum(unmasked, steps)
  if st.has_segments:
    unmasked = jnp.int32(0)
  # A CTA of padded rows only (q_pad rounds up to the largest tile) is sliced
  # away: it streams nothing.
  steps = jnp.where(q_first < st.q_len, steps, 0)
  return steps, jnp.minimum(unmasked, steps)


def masked_tail(st: MosaicStatic, block_kv: int) -> bool:
  """Whether the last key tile holds padded keys that must be masked.

  With causal masking a real row never sees a padded key (j <= i + offset
  < kv_len), and padded rows are sliced away, so only the full mask needs it.
  """
  return st.kv_len % block_kv != 0 and not st.causal



def q_steps(st: MosaicStatic, kv_first, kv_rows: int, block_q: int):
  """Query tiles a CTA of keys [kv_first, kv_first + kv_rows) streams, per head.

  Returns (first, unmasked_from, end): tiles [first, end) see some key of
  the CTA, and tiles [unmasked_from, end) see all of them (causal; segment
  ids mask every tile). Query tiles of padded rows only are skipped.
  """
  end = pl.cdiv(st.q_len, block_q)
  if not st.causal:
    first = jnp.int32(0)
    unmasked_from = jnp.int32(end if st.has_segments else 0)
    return first, unmasked_from, jnp.int32(end)
  # Query i sees key j iff i >= j - offset.
  first = jnp.clip(lax.div(jnp.maximum(kv_first - st.offset, 0), jnp.int32(block_q)),
                   0, end)
  last_key = kv_first + kv_rows - 1
  whole = lax.div(jnp.maximum(last_key - st.offset, 0) + block_q - 1,
                  jnp.int32(block_q))
  unmasked_from = jnp.clip(whole, first, end)
  if st.has_segments:
    unmasked_from = jnp.int32(end)
  # A CTA of padded keys only is sliced away.
  first = jnp.where(kv_first < st.kv_len, first, end)
  return first, jnp.maximum(unmasked_from, first), jnp.int32(end)
