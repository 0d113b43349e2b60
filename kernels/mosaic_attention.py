"""Fused softmax attention for Hopper GPUs (sm_90a) in Pallas' Mosaic GPU backend.

The same contract as `kernels.pallas_attention` (layout [batch, len, heads,
head_dim], bottom-right causal alignment, key padding and segment ids from
`kernels.masking`, grouped-query heads without repeating K/V, any lengths,
rows that see no key give zeros and zero gradients), for bfloat16 and
float16, written for what Hopper has and Triton does not let us steer
(FlashAttention-3, Shah et al. 2024):

  * warp specialisation: each CTA runs three warpgroups. One (the producer,
    40 registers a thread) only issues TMA bulk copies of the streamed tiles
    into a `num_stages`-deep shared-memory ring; two consumers (232
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
padded to a multiple of 64 (at most 128, see MAX_HEAD_DIM); the lengths are padded to the
tiles and padded keys are masked. `interpret=` runs the kernels in Pallas'
Mosaic GPU interpreter (JAX >= 0.11) on any machine; the test suite does so.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import masking
from kernels.block_sizes import pad_axis

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SMEM_BYTES = 227 * 1024  # Largest shared-memory carve-out per block (H100).
# dK and dV accumulators of a 64-key block at head dim d take d registers a
# thread together (2 x 64 x d float32 over 128 threads); past 128 they do not
# fit a consumer's 240 beside the tiles, and the dQ kernel's shared memory
# passes 227 KiB. Head dim 256 needs the accumulators split over the head
# dim: not built; 'pallas' takes it.
MAX_HEAD_DIM = 128
HEAD_DIM_QUANTUM = 64  # 64 16-bit elements: one 128-byte swizzled row.
MIN_JAX = (0, 11)
COMPUTE_WARPGROUPS = 2
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 240


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


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
      if not isinstance(value, int) or not _is_power_of_two(value) or value < 64:
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
    spills for sm_90a (`python -m kernels.mosaic_inspect`); not yet tuned
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
class _Static:
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


def _compiler_params():
  # approx_math: exp2 and the reciprocal through the fast MUFU paths, as
  # every FlashAttention kernel does (relative error ~2^-22).
  return plgpu.CompilerParams(approx_math=True)


def _tile_transforms():
  # wgmma reads 64-element-wide swizzled tiles; TMA writes them that way.
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _row_vector(value: float, rows: int):
  return plgpu.layout_cast(jnp.full((rows,), value, jnp.float32),
                           plgpu.Layout.WGMMA.reduce(1))


def _zeros_acc(rows: int, cols: int):
  return plgpu.layout_cast(jnp.zeros((rows, cols), jnp.float32),
                           plgpu.Layout.WGMMA)


def _positions(start, shape, axis: int):
  """start + the index along `axis` of a [rows, cols] WGMMA tile, int32.

  Built as a vector (a thread holds 2 rows, or 16 columns of 64) and then
  broadcast, rather than as a full tile iota: the kernels that hold two
  accumulators have no registers for two [64, 64] int32 tiles.
  """
  layout = plgpu.Layout.WGMMA.reduce(1 - axis)
  vector = plgpu.broadcasted_iota(jnp.int32, (shape[axis],), 0, layout=layout)
  return lax.broadcast_in_dim(start + vector, shape, [axis])


def _hide(st: _Static, s, q_first, kv_first, q_ids=None, kv_ids=None, *,
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
    keys = _positions(kv_first, shape, kv_axis)
    if st.causal:
      visible = both(keys <= _positions(q_first, shape, q_axis) + st.offset)
    if tail:
      visible = both(keys < st.kv_len)
  if q_ids is not None:
    visible = both(lax.broadcast_in_dim(q_ids, shape, [q_axis])
                   == lax.broadcast_in_dim(kv_ids, shape, [kv_axis]))
  return jnp.where(visible, s, -jnp.inf)


def _kv_steps(st: _Static, q_first, q_rows: int, block_kv: int):
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


def _masked_tail(st: _Static, block_kv: int) -> bool:
  """Whether the last key tile holds padded keys that must be masked.

  With causal masking a real row never sees a padded key (j <= i + offset
  < kv_len), and padded rows are sliced away, so only the full mask needs it.
  """
  return st.kv_len % block_kv != 0 and not st.causal


# --------------------------------------------------------------------------
# Forward.


def _forward(q, k, v, segments, st: _Static):
  """out [b, q_pad, h, d] (q.dtype) and L [b, h, q_pad] float32 (log2 units,
  +inf on a row that sees no key) from padded inputs."""
  b, q_pad, h, d = q.shape
  bq, bkv, stages = st.blocks.block_q, st.blocks.block_kv, st.blocks.num_stages
  wgs = COMPUTE_WARPGROUPS
  dtype = q.dtype
  c = st.score_scale
  tail = _masked_tail(st, bkv)

  def kernel(q_ref, k_ref, v_ref, *rest):
    if st.has_segments:
      qseg_ref, kvseg_ref, out_ref, lse_ref, scratch, barriers = rest
    else:
      out_ref, lse_ref, scratch, barriers = rest
    qo_smem, k_smem, v_smem, lse_smem, qseg_smem, kvseg_smem = scratch
    (q_loaded, k_loaded, v_loaded, seg_loaded, k_consumed, v_consumed,
     schedule) = barriers
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_first = lax.axis_index("q_seq") * (wgs * bq)
    steps, unmasked = _kv_steps(st, cta_first, wgs * bq, bkv)

    def sync_turn():
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      first = cta_first + wg * bq
      rows = (batch, pl.ds(first, bq), head)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], qo_smem.at[wg], q_loaded.at[wg])
      q_ids = None
      if st.has_segments:
        plgpu.copy_gmem_to_smem(qseg_ref.at[batch, pl.ds(first, bq)],
                                qseg_smem.at[wg], q_loaded.at[wg + wgs])
        plgpu.barrier_wait(q_loaded.at[wg + wgs])
        q_ids = plgpu.load(qseg_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
      plgpu.barrier_wait(q_loaded.at[wg])

      @pl.when(steps > 0)
      def _():
        plgpu.barrier_wait(k_loaded.at[0])

      # Offsets the two consumers by half a step: wg 1 waits for wg 0's
      # first product before issuing its own.
      pl.when(wg == 1)(sync_turn)

      def step(j, carry, *, masked: bool):
        acc, m, l = carry
        slot = lax.rem(j, jnp.int32(stages))

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
          sync_turn()  # let the other consumer issue while ours runs
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        if masked:
          kv_ids = None
          if st.has_segments:
            plgpu.barrier_wait(seg_loaded.at[slot])
            kv_ids = plgpu.load(kvseg_smem.at[slot],
                                layout=plgpu.Layout.WGMMA.reduce(0))
          s = _hide(st, s, first, j * bkv, q_ids, kv_ids, q_axis=0, tail=tail)
        # K (and the slot's ids) are read: the producer may refill them.
        plgpu.barrier_arrive(k_consumed.at[slot])

        m_new = jnp.maximum(m, s.max(axis=1) * c)
        # A row with no visible key so far keeps m = -inf; subtracting 0
        # instead keeps exp2 at 0 there rather than NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha + p.sum(axis=1)
        p = p.astype(dtype)
        acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
        plgpu.barrier_arrive(schedule)  # softmax done: the other may multiply
        plgpu.barrier_wait(v_loaded.at[slot])
        plgpu.barrier_wait(schedule)  # the tensor cores are ours again

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p, v_smem.at[slot])
          nxt = j + 1
          @pl.when(nxt < steps)
          def _():
            plgpu.barrier_wait(k_loaded.at[lax.rem(nxt, jnp.int32(stages))])
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_consumed.at[slot])
        return acc, m_new, l

      carry = (_zeros_acc(bq, d), _row_vector(-jnp.inf, bq), _row_vector(0.0, bq))
      carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False),
                            carry)
      if st.causal or tail or st.has_segments:
        carry = lax.fori_loop(unmasked, steps,
                              functools.partial(step, masked=True), carry)
      acc, m, l = carry
      pl.when(wg == 0)(sync_turn)

      seen = l > 0.0
      inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
      qo_smem.at[wg][...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])
                             ).astype(dtype)
      lse_smem.at[wg][...] = jnp.where(
          seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem.at[wg], out_ref.at[rows])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg],
                              lse_ref.at[batch, head, pl.ds(first, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
      kv_head = lax.div(head, jnp.int32(st.group))

      @pl.loop(0, steps)
      def _(j):
        slot = lax.rem(j, jnp.int32(stages))
        keys = (batch, pl.ds(j * bkv, bkv), kv_head)
        @pl.when(j >= stages)
        def _():
          plgpu.barrier_wait(k_consumed.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_loaded.at[slot])
        if st.has_segments:
          plgpu.copy_gmem_to_smem(kvseg_ref.at[batch, pl.ds(j * bkv, bkv)],
                                  kvseg_smem.at[slot], seg_loaded.at[slot])
        @pl.when(j >= stages)
        def _():
          plgpu.barrier_wait(v_consumed.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_loaded.at[slot])

  tiles = _tile_transforms()
  scratch = (
      plgpu.SMEM((wgs, bq, d), dtype, transforms=tiles),
      plgpu.SMEM((stages, bkv, d), dtype, transforms=tiles),
      plgpu.SMEM((stages, bkv, d), dtype, transforms=tiles),
      plgpu.SMEM((wgs, bq), jnp.float32),
      plgpu.SMEM((wgs, bq), jnp.int32),
      plgpu.SMEM((stages, bkv), jnp.int32),
  )
  barriers = (
      plgpu.Barrier(num_barriers=2 * wgs),  # Q, then q segment ids, per consumer
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs),
  )
  args = [q, k, v] + (list(segments) if st.has_segments else [])
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, q_pad, h, d), dtype),
                jax.ShapeDtypeStruct((b, h, q_pad), jnp.float32)),
      scratch_types=(scratch, barriers),
      grid=(h, q_pad // (wgs * bq), b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=_compiler_params(),
      kernel_name="fusedlm_mosaic_fwd",
      interpret=st.interpret or None,
  )(*args)


# --------------------------------------------------------------------------
# Backward: dQ.


def _backward_dq(q, k, v, segments, do, lse, delta, st: _Static):
  """dQ [b, q_pad, h, d]: each CTA owns 2 * block_q_dq rows and streams K, V."""
  b, q_pad, h, d = q.shape
  bq, bkv = st.blocks.block_q_dq, st.blocks.block_kv_dq
  stages = st.blocks.num_stages_bwd
  wgs = COMPUTE_WARPGROUPS
  dtype = q.dtype
  c = st.score_scale
  tail = _masked_tail(st, bkv)
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
    if st.has_segments:
      qseg_ref, kvseg_ref, dq_ref, scratch, barriers = rest
    else:
      dq_ref, scratch, barriers = rest
    (q_smem, do_smem, lse_smem, delta_smem, qseg_smem, k_smem, v_smem,
     kvseg_smem) = scratch
    rows_loaded, kv_loaded, consumed = barriers
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_first = lax.axis_index("q_seq") * (wgs * bq)
    steps, unmasked = _kv_steps(st, cta_first, wgs * bq, bkv)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      first = cta_first + wg * bq
      rows = (batch, pl.ds(first, bq), head)
      row_vec = (batch, head, pl.ds(first, bq))
      loads = [(q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem),
               (lse_ref.at[row_vec], lse_smem), (delta_ref.at[row_vec], delta_smem)]
      if st.has_segments:
        loads.append((qseg_ref.at[batch, pl.ds(first, bq)], qseg_smem))
      for src, dst in loads:  # one barrier counts every copy's arrival
        plgpu.copy_gmem_to_smem(src, dst.at[wg], rows_loaded.at[wg])
      plgpu.barrier_wait(rows_loaded.at[wg])
      lse = plgpu.load(lse_smem.at[wg], layout=row_layout)
      delta = plgpu.load(delta_smem.at[wg], layout=row_layout)
      q_ids = (plgpu.load(qseg_smem.at[wg], layout=row_layout)
               if st.has_segments else None)

      def step(j, dq_acc, *, masked: bool):
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_wait(kv_loaded.at[slot])
        shape = (bq, bkv)

        def scores(acc_ref):
          plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]
        s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
        if masked:
          kv_ids = (plgpu.load(kvseg_smem.at[slot],
                               layout=plgpu.Layout.WGMMA.reduce(0))
                    if st.has_segments else None)
          s = _hide(st, s, first, j * bkv, q_ids, kv_ids, q_axis=0, tail=tail)
        # L = +inf on a row that sees no key, so P = 0 there.
        p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, shape, [0]))

        def dp_product(acc_ref):
          plgpu.wgmma(acc_ref, do_smem.at[wg], v_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]
        dp = pl.run_scoped(dp_product, plgpu.ACC(shape, jnp.float32))
        ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))

        def dq_product(acc_ref):
          plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])
        dq_acc = pl.run_state(dq_product)(plgpu.ACC.init(dq_acc))
        # run_state read the accumulator back, which waited for the product:
        # nothing reads the slot any more.
        plgpu.barrier_arrive(consumed.at[slot])
        return dq_acc

      dq_acc = lax.fori_loop(0, unmasked, functools.partial(step, masked=False),
                             _zeros_acc(bq, d))
      if st.causal or tail or st.has_segments:
        dq_acc = lax.fori_loop(unmasked, steps,
                               functools.partial(step, masked=True), dq_acc)
      # dS is in the units of the scaled scores: dQ = scale dS K.
      q_smem.at[wg][...] = (dq_acc * st.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
      kv_head = lax.div(head, jnp.int32(st.group))

      @pl.loop(0, steps)
      def _(j):
        slot = lax.rem(j, jnp.int32(stages))
        keys = (batch, pl.ds(j * bkv, bkv), kv_head)
        @pl.when(j >= stages)
        def _():
          plgpu.barrier_wait(consumed.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], kv_loaded.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], kv_loaded.at[slot])
        if st.has_segments:
          plgpu.copy_gmem_to_smem(kvseg_ref.at[batch, pl.ds(j * bkv, bkv)],
                                  kvseg_smem.at[slot], kv_loaded.at[slot])

  tiles = _tile_transforms()
  row_copies = 5 if st.has_segments else 4
  kv_copies = 3 if st.has_segments else 2
  scratch = (
      plgpu.SMEM((wgs, bq, d), dtype, transforms=tiles),  # Q, then dQ
      plgpu.SMEM((wgs, bq, d), dtype, transforms=tiles),  # dO
      plgpu.SMEM((wgs, bq), jnp.float32),  # L
      plgpu.SMEM((wgs, bq), jnp.float32),  # D
      plgpu.SMEM((wgs, bq), jnp.int32),  # q segment ids
      plgpu.SMEM((stages, bkv, d), dtype, transforms=tiles),
      plgpu.SMEM((stages, bkv, d), dtype, transforms=tiles),
      plgpu.SMEM((stages, bkv), jnp.int32),
  )
  barriers = (
      plgpu.Barrier(num_arrivals=row_copies, num_barriers=wgs),
      plgpu.Barrier(num_arrivals=kv_copies, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  )
  args = [q, k, v, do, lse, delta] + (list(segments) if st.has_segments else [])
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=(scratch, barriers),
      grid=(h, q_pad // (wgs * bq), b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=_compiler_params(),
      kernel_name="fusedlm_mosaic_bwd_dq",
      interpret=st.interpret or None,
  )(*args)


# --------------------------------------------------------------------------
# Backward: dK, dV.


def _q_steps(st: _Static, kv_first, kv_rows: int, block_q: int):
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


def _backward_dkv(q, k, v, segments, do, lse, delta, st: _Static):
  """dK, dV [b, kv_pad, kv_heads, d]: each CTA owns 2 * block_kv_dkv keys of
  one K/V head and streams Q, dO, L and D tiles of every query head of its
  group, so the group's sum happens in the accumulators."""
  b, q_pad, h, d = q.shape
  kv_pad, hkv = k.shape[1], k.shape[2]
  bq, bkv = st.blocks.block_q_dkv, st.blocks.block_kv_dkv
  stages = st.blocks.num_stages_bwd
  wgs = COMPUTE_WARPGROUPS
  dtype = q.dtype
  c = st.score_scale
  col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per query column

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
    if st.has_segments:
      qseg_ref, kvseg_ref, dk_ref, dv_ref, scratch, barriers = rest
    else:
      dk_ref, dv_ref, scratch, barriers = rest
    (k_smem, v_smem, kvseg_smem, q_ring, do_ring, lse_ring, delta_ring,
     qseg_ring) = scratch
    keys_loaded, rows_loaded, consumed = barriers
    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_first = lax.axis_index("kv_seq") * (wgs * bkv)
    first, unmasked_from, end = _q_steps(st, cta_first, wgs * bkv, bq)
    per_head = end - first
    steps = st.group * per_head

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      key_first = cta_first + wg * bkv
      keys = (batch, pl.ds(key_first, bkv), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[wg], keys_loaded.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[wg], keys_loaded.at[wg])
      if st.has_segments:
        plgpu.copy_gmem_to_smem(kvseg_ref.at[batch, pl.ds(key_first, bkv)],
                                kvseg_smem.at[wg], keys_loaded.at[wg])
      plgpu.barrier_wait(keys_loaded.at[wg])
      kv_ids = (plgpu.load(kvseg_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                if st.has_segments else None)
      shape = (bkv, bq)  # transposed tiles: keys are rows, queries columns

      def step(t, i, carry, *, masked: bool):
        dk_acc, dv_acc = carry
        slot = lax.rem(t, jnp.int32(stages))
        plgpu.barrier_wait(rows_loaded.at[slot])

        def scores(acc_ref):
          plgpu.wgmma(acc_ref, k_smem.at[wg], q_ring.at[slot].transpose((1, 0)))
          return acc_ref[...]
        s_t = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
        if masked:
          q_ids = (plgpu.load(qseg_ring.at[slot], layout=col_layout)
                   if st.has_segments else None)
          s_t = _hide(st, s_t, i * bq, key_first, q_ids, kv_ids, q_axis=1,
                      tail=False)
        lse = plgpu.load(lse_ring.at[slot], layout=col_layout)
        # P is kept only in the input dtype: dV's product takes it so, and
        # dS = P (dP - D) from it is rounded to that dtype for dK's product
        # anyway. The float32 copy (32 registers a thread) made this kernel,
        # which holds dK and dV, spill at head dim 128.
        p_t = jnp.exp2(s_t * c - lax.broadcast_in_dim(lse, shape, [1])).astype(dtype)

        def dv_and_dp(refs):
          # Both products in one scope: one wgmma wait for the pair.
          dv_ref_, dp_ref_ = refs
          plgpu.wgmma(dv_ref_, p_t, do_ring.at[slot])
          plgpu.wgmma(dp_ref_, v_smem.at[wg], do_ring.at[slot].transpose((1, 0)))
        dv_acc, dp_t = pl.run_state(dv_and_dp)(
            (plgpu.ACC.init(dv_acc), plgpu.ACC.init(_zeros_acc(*shape))))
        delta = plgpu.load(delta_ring.at[slot], layout=col_layout)
        ds_t = p_t.astype(jnp.float32) * (
            dp_t - lax.broadcast_in_dim(delta, shape, [1]))

        def dk_product(acc_ref):
          plgpu.wgmma(acc_ref, ds_t.astype(dtype), q_ring.at[slot])
        dk_acc = pl.run_state(dk_product)(plgpu.ACC.init(dk_acc))
        plgpu.barrier_arrive(consumed.at[slot])  # the products are done
        return dk_acc, dv_acc

      def head_loop(g, carry):
        base = g * per_head - first  # step number of tile i is base + i
        run = lambda lo, hi, carry, masked: lax.fori_loop(
            lo, hi, lambda i, cr: step(base + i, i, cr, masked=masked), carry)
        if st.causal or st.has_segments:
          carry = run(first, unmasked_from, carry, True)
        return run(unmasked_from, end, carry, False)

      zeros = _zeros_acc(bkv, d)
      dk_acc, dv_acc = lax.fori_loop(0, st.group, head_loop, (zeros, zeros))
      # The K and V tiles are read by no pending product: reuse them.
      k_smem.at[wg][...] = (dk_acc * st.scale).astype(dtype)
      v_smem.at[wg][...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[keys])
      plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[keys])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

      @pl.loop(0, steps)
      def _(t):
        slot = lax.rem(t, jnp.int32(stages))
        g = lax.div(t, jnp.maximum(per_head, 1))
        i = first + t - g * per_head
        head = kv_head * st.group + g
        rows = (batch, pl.ds(i * bq, bq), head)
        row_vec = (batch, head, pl.ds(i * bq, bq))
        @pl.when(t >= stages)
        def _():
          plgpu.barrier_wait(consumed.at[slot])
        loaded = rows_loaded.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_ring.at[slot], loaded)
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_ring.at[slot], loaded)
        plgpu.copy_gmem_to_smem(lse_ref.at[row_vec], lse_ring.at[slot], loaded)
        plgpu.copy_gmem_to_smem(delta_ref.at[row_vec], delta_ring.at[slot], loaded)
        if st.has_segments:
          plgpu.copy_gmem_to_smem(qseg_ref.at[batch, pl.ds(i * bq, bq)],
                                  qseg_ring.at[slot], loaded)

  tiles = _tile_transforms()
  key_copies = 3 if st.has_segments else 2
  row_copies = 5 if st.has_segments else 4
  scratch = (
      plgpu.SMEM((wgs, bkv, d), dtype, transforms=tiles),  # K, then dK
      plgpu.SMEM((wgs, bkv, d), dtype, transforms=tiles),  # V, then dV
      plgpu.SMEM((wgs, bkv), jnp.int32),
      plgpu.SMEM((stages, bq, d), dtype, transforms=tiles),
      plgpu.SMEM((stages, bq, d), dtype, transforms=tiles),
      plgpu.SMEM((stages, bq), jnp.float32),
      plgpu.SMEM((stages, bq), jnp.float32),
      plgpu.SMEM((stages, bq), jnp.int32),
  )
  barriers = (
      plgpu.Barrier(num_arrivals=key_copies, num_barriers=wgs),
      plgpu.Barrier(num_arrivals=row_copies, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  )
  args = [q, k, v, do, lse, delta] + (list(segments) if st.has_segments else [])
  kv_shape = jax.ShapeDtypeStruct(k.shape, dtype)
  return plgpu.kernel(
      kernel,
      out_type=(kv_shape, kv_shape),
      scratch_types=(scratch, barriers),
      grid=(hkv, kv_pad // (wgs * bkv), b),
      grid_names=("heads", "kv_seq", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=_compiler_params(),
      kernel_name="fusedlm_mosaic_bwd_dkv",
      interpret=st.interpret or None,
  )(*args)


# --------------------------------------------------------------------------
# The differentiable op and its entry point.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segments, st: _Static):
  return _forward(q, k, v, segments, st)[0]


def _attention_fwd(q, k, v, segments, st: _Static):
  out, lse = _forward(q, k, v, segments, st)
  return out, (q, k, v, segments, out, lse)


def _attention_bwd(st: _Static, residuals, do):
  q, k, v, segments, out, lse = residuals
  # D = rowsum(dO * O) (FlashAttention-2, Algorithm 2 line 4): O(N d) in XLA.
  delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32),
                     out.astype(jnp.float32))
  dq = _backward_dq(q, k, v, segments, do, lse, delta, st)
  dk, dv = _backward_dkv(q, k, v, segments, do, lse, delta, st)
  return dq, dk, dv, None


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


def _check_device():
  if jax.__version_info__ < MIN_JAX:
    raise ValueError(
        f"implementation='mosaic' needs JAX >= 0.11, this is {jax.__version__}.")
  if jax.default_backend() != "gpu":
    raise ValueError(
        "implementation='mosaic' compiles for Hopper GPUs (sm_90a) only; the"
        f" default backend is {jax.default_backend()!r}: pass interpret=True"
        " or use implementation='pallas' / 'xla'.")
  capability = getattr(jax.devices()[0], "compute_capability", "")
  if not str(capability).startswith("9."):
    raise ValueError(
        "implementation='mosaic' uses Hopper's wgmma and TMA (compute"
        f" capability 9.x); this GPU has {capability or 'unknown'}: use"
        " implementation='pallas'.")


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
    _check_device()
  return attention_any_backend(
      q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
      block_sizes=block_sizes, interpret=interpret)


def attention_any_backend(q, k, v, *, causal=False, scale=None,
                          key_padding_mask=None, segment_ids=None,
                          kv_segment_ids=None, block_sizes=None,
                          interpret=False):
  """`mosaic_attention` without its device check, unjitted.

  For compiling the kernels for an H100 on a machine without one
  (`kernels.mosaic_inspect`); callers should use `mosaic_attention`.
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
  st = _Static(
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
