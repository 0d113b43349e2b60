"""What the Mosaic GPU attention kernels share: tiles, head dims, static settings, launch.

`kernels.mosaic.forward`, `kernels.mosaic.backward_dq` and
`kernels.mosaic.backward_dkv` hold the kernels, `kernels.mosaic.attention`
the differentiable entry point and the design. Shapes are named per helper;
a tile is [rows, cols] float32 in the WGMMA layout of one consumer
warpgroup (64 rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fusedlm.kernels import variants
from fusedlm.kernels.tiling import LOG2E, SMEM_BYTES, is_power_of_two

MAX_HEAD_DIM = 256
HEAD_DIM_QUANTUM = 64  # 64 16-bit elements: one 128-byte swizzled row.
# Past this head dim a consumer has no registers for a whole row block's
# accumulators beside its tiles (2 x 64 x d float32 for dK and dV over 128
# threads: d registers a thread, of 240). The backward kernels then share
# rows (dQ: each consumer holds one half of the head dim) or keys (dK/dV:
# one consumer holds dK, the other dV) between their two consumers.
SPLIT_HEAD_DIM = 128
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
CTA_AXIS = "fusedlm_mosaic_cta"  # the persistent forward grid's one axis
# How Pallas lays out shared memory (JAX 0.11.2): every scratch buffer starts
# on a 1024-byte boundary, a kernel with row reductions reserves 2 KiB for
# them (CompilerParams.reduction_scratch_bytes), and the barriers come after.
SMEM_ALIGNMENT = 1024
REDUCTION_SCRATCH_BYTES = 2048
BARRIER_BYTES = 512


@dataclasses.dataclass(frozen=True)
class Dims:
  """The padded head dims of a call, the byte sizes of its tiles, and how
  the backward kernels share them between their consumers."""

  d: int  # q and k head dim, padded
  dv: int  # v head dim, padded
  itemsize: int  # of q, k, v
  bias_itemsize: int = 0  # of the bias; 0 without one
  # The dK/dV kernel's consumers share their keys, one holding dK and the
  # other dV (past SPLIT_HEAD_DIM always; see `mosaic.attention`).
  dkv_roles: bool = False

  @classmethod
  def padded(cls, head_dim: int, v_head_dim: int, itemsize: int,
             bias_itemsize: int = 0, dkv_roles: bool = False) -> "Dims":
    """Each head dim padded to whole 64-wide swizzled rows, or to whole
    halves of 128-wide ones where the dQ kernel splits them."""
    wide = max(head_dim, v_head_dim) > SPLIT_HEAD_DIM
    quantum = HEAD_DIM_QUANTUM * (2 if wide else 1)
    pad = lambda n: pl.cdiv(n, quantum) * quantum
    return cls(pad(head_dim), pad(v_head_dim), itemsize, bias_itemsize,
               dkv_roles or wide)

  @property
  def parts(self) -> int:
    """Head-dim halves the dQ kernel's consumers split (1: each owns its rows)."""
    return 2 if max(self.d, self.dv) > SPLIT_HEAD_DIM else 1


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
    At head dims over 128 the backward CTAs own block_q_dq rows and
    block_kv_dkv keys (the consumers split the head dim instead).

  Schedules, off by default until a GPU run measures them (BENCHMARKS.md,
  the Hopper kernel's tuning plan; `fusedlm bench-attention
  --impls=mosaic,mosaic:bwd_pingpong=1` puts them side by side):
  bwd_pingpong: 1 makes the backward consumers take turns at the tensor
    cores, as the forward's do (step M6); persistent: 0 launches one forward
    CTA per block of rows; N > 0 launches N (the GPU's SM count: 132 on an
    H100 or H200) that loop over the blocks, the longest first (step M7);
  dq_atomic: 1 computes dQ in the dK/dV kernel, each consumer adding its
    keys' share dS K of a query tile into a float32 dQ in global memory by a
    TMA reduce-add, instead of a second kernel that recomputes S and dP
    (step M5: 5 tile products per pair instead of 7). It applies at head
    dims up to 128 in the dK/dV kernel's keys layout (past 64 the consumers
    split dQ's head dim, `dq_share_split`, and only without a causal mask
    or window), without a bias (d bias comes from the dQ kernel's dS) and
    not with both the soft-cap and dropout (`dq_in_dkv`); elsewhere the
    dQ kernel runs;
  fwd_overlap: 1 pipelines each forward consumer's own products, as
    FlashAttention-3's intra-warpgroup overlap: S = QK^T of key tile j and
    O += P V of tile j - 1 are issued together, and tile j's softmax runs
    while the PV product does (step M8; every variant and head dim).
  """

  block_q: int = 64
  block_kv: int = 128
  num_stages: int = 2
  block_q_dq: int = 64
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  num_stages_bwd: int = 2
  bwd_pingpong: int = 0
  persistent: int = 0
  dq_atomic: int = 0
  fwd_overlap: int = 0

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
    if self.bwd_pingpong not in (0, 1):
      raise ValueError(
          f"MosaicBlockSizes.bwd_pingpong must be 0 or 1, got {self.bwd_pingpong!r}.")
    if self.fwd_overlap not in (0, 1):
      raise ValueError(
          f"MosaicBlockSizes.fwd_overlap must be 0 or 1, got {self.fwd_overlap!r}.")
    if self.dq_atomic not in (0, 1):
      raise ValueError(
          f"MosaicBlockSizes.dq_atomic must be 0 or 1, got {self.dq_atomic!r}.")
    if self.dq_atomic and self.bwd_pingpong:
      raise ValueError(
          "MosaicBlockSizes.dq_atomic and bwd_pingpong do not combine (yet):"
          " set one of them.")
    if not isinstance(self.persistent, int) or self.persistent < 0:
      raise ValueError(
          "MosaicBlockSizes.persistent must be 0 (a CTA per block of rows) or"
          f" the number of CTAs, got {self.persistent!r}.")

  @classmethod
  def get_default(cls, dims: Dims) -> "MosaicBlockSizes":
    """The table, compiled without spills for sm_90a (`fusedlm inspect
    mosaic`); not yet tuned on a GPU. Where a variant's tiles (a bias) or a
    wide head dim would overflow shared memory, the streamed tiles shrink to
    64 rows."""
    blocks = cls()
    if max(dims.d, dims.dv) > SPLIT_HEAD_DIM:
      blocks = dataclasses.replace(blocks, block_kv=64)
    used = blocks.smem_bytes(dims)
    if used["forward"] > SMEM_BYTES:
      blocks = dataclasses.replace(blocks, block_kv=64)
    return blocks

  def smem_bytes(self, dims: Dims) -> dict[str, int]:
    """Shared memory of each kernel: its scratch buffers, each aligned as
    Pallas allocates them, the forward's reduction scratch, and a margin
    for the barriers."""
    wgs, n, bias = COMPUTE_WARPGROUPS, dims.itemsize, dims.bias_itemsize
    s = self.num_stages
    bq, bkv = self.block_q, self.block_kv
    fwd = [wgs * bq * dims.d * n,  # Q, reused for O
           wgs * bq * dims.dv * n if dims.dv != dims.d else 0,  # O
           s * bkv * dims.d * n, s * bkv * dims.dv * n,  # K and V rings
           wgs * bq * 4, wgs * bq * 4, s * bkv * 4,  # L out, segment ids
           s * wgs * bq * bkv * bias]
    # With the head dim split, both consumers share one block of rows (keys).
    sets = wgs if dims.parts == 1 else 1
    s = self.num_stages_bwd
    bq, bkv = self.block_q_dq, self.block_kv_dq
    dq = [sets * bq * dims.d * n, sets * bq * dims.dv * n,  # Q (then dQ), dO
          sets * bq * 4, sets * bq * 4, sets * bq * 4,  # L, D, segment ids
          s * bkv * dims.d * n, s * bkv * dims.dv * n, s * bkv * 4,  # K, V ring
          s * sets * bq * bkv * bias,
          sets * bq * bkv * 4 if bias and (bias < 4 or sets == 1) else 0]  # dS out (d bias)
    sets = 1 if dims.dkv_roles else wgs
    bq, bkv = self.block_q_dkv, self.block_kv_dkv
    dkv = [sets * bkv * dims.d * n, sets * bkv * dims.dv * n,  # K, V (then dK, dV)
           sets * bkv * 4,
           s * bq * dims.d * n, s * bq * dims.dv * n,  # Q, dO ring
           s * bq * 4, s * bq * 4, s * bq * 4,  # L, D, segment ids
           s * sets * bkv * bq * bias,
           s * bkv * bq * n if dims.dkv_roles else 0]  # P, dV's side to dK's
    if dq_in_dkv(self, dims):  # each consumer's dS^T, and its dQ share in float32
      # Split: dS^T is double-buffered (the other consumer reads it), and
      # each share is half the head dim wide.
      split = dq_share_split(dims)
      dkv += [(2 if split else 1) * sets * bkv * bq * n,
              sets * bq * (dims.d // (wgs if split else 1)) * 4]
    total = lambda buffers: sum(
        pl.cdiv(x, SMEM_ALIGNMENT) * SMEM_ALIGNMENT for x in buffers) + BARRIER_BYTES
    return {"forward": total(fwd) + REDUCTION_SCRATCH_BYTES, "dq": total(dq),
            "dkv": total(dkv)}


# Head dims up to which the dK/dV consumers also take dQ's share (dq_atomic),
# and past which they split it. Up to 64 each consumer multiplies its own
# keys' dS by K into a [64, d] float32 share. At 128 that share (64
# registers a thread beside dK's and dV's 128) spilled 16-172 bytes, so
# there, as FlashAttention-3 does, both consumers put dS^T in shared memory
# and each multiplies the whole CTA's dS by one half of K's columns: a
# [64, d / 2] share (32 registers), and one reduce-add per CTA and tile.
DQ_IN_DKV_MAX_HEAD_DIM = 128
DQ_SHARE_SPLIT_HEAD_DIM = 64


def dq_in_dkv(blocks: MosaicBlockSizes, dims: Dims,
              var: variants.Variants | None = None, causal: bool = False) -> bool:
  """Whether the dK/dV kernel adds up dQ itself (`MosaicBlockSizes.dq_atomic`).

  var, causal: the call's variants and causal flag; var None (shared-memory
  accounting) assumes the layout applies. Where it does not, because the
  dK/dV kernel spilled with the dQ share (sm_90a, `fusedlm inspect mosaic`):
    * the soft-cap and dropout together at head dim 64 (100-152 bytes; each
      alone compiles without spills). At 128 either one puts the kernel in
      its roles layout (`Dims.dkv_roles`), which has no dQ share;
    * a diagonal mask (causal or a window) with the split share, past head
      dim 64 (92-136 bytes: the masked steps' key and diagonal positions on
      top of dK, dV and the share). Segment ids and padded keys compile
      without spills there.
  """
  if var is not None and var.soft_cap is not None and var.dropout_rate > 0.0:
    return False
  diagonal = causal or (var is not None and var.window is not None)
  if diagonal and dq_share_split(dims):
    return False
  return (bool(blocks.dq_atomic) and not dims.dkv_roles and not dims.bias_itemsize
          and max(dims.d, dims.dv) <= DQ_IN_DKV_MAX_HEAD_DIM)


def dq_share_split(dims: Dims) -> bool:
  """Whether the dK/dV consumers split dQ's head dim (with dq_in_dkv):
  each then multiplies both consumers' dS (read from shared memory after a
  barrier) by its half of K's columns."""
  return dims.d > DQ_SHARE_SPLIT_HEAD_DIM


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
  offset: int  # query i sits at key position i + offset (kernels.variants)
  dims: Dims
  var: variants.Variants = variants.Variants()

  @property
  def score_scale(self) -> float:
    """Multiplier taking a raw q.k product to log2 units."""
    return self.scale * LOG2E


def bias_index(st: MosaicStatic, batch, head):
  """The (batch, head) of the bias array [batch|1, heads|1, ...] to read."""
  per_batch, per_head = st.var.bias
  return (batch if per_batch else 0), (head if per_head else 0)


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
