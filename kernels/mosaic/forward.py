"""The Mosaic GPU attention forward: one CTA per 2 x block_q query rows of one head.

Design and synchronisation: `kernels.mosaic.attention`'s docstring.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fusedlm.kernels.mosaic.tiles import (
  BATCH_AXIS,
  COMPUTE_WARPGROUPS,
  CONSUMER_REGISTERS,
  HEAD_AXIS,
  PRODUCER_REGISTERS,
  Q_AXIS,
  WARPGROUP_AXIS,
  MosaicStatic,
  hide,
  kv_steps,
  launch,
  masked_tail,
  row_vector,
  tile_transforms,
  zeros_acc,
)


def forward(q, k, v, segments, st: MosaicStatic):
  """out [b, q_pad, h, d] (q.dtype) and L [b, h, q_pad] float32 (log2 units,
  +inf on a row that sees no key) from padded inputs."""
  b, q_pad, h, d = q.shape
  bq, bkv, stages = st.blocks.block_q, st.blocks.block_kv, st.blocks.num_stages
  wgs = COMPUTE_WARPGROUPS
  dtype = q.dtype
  c = st.score_scale
  tail = masked_tail(st, bkv)

  def kernel(q_ref, k_ref, v_ref, *rest):
    if st.has_segments:
      qseg_ref, kvseg_ref, out_ref, lse_ref, scratch, barriers = rest
    else:
      out_ref, lse_ref, scratch, barriers = rest
    qo_smem, k_smem, v_smem, lse_smem, qseg_smem, kvseg_smem = scratch
    (q_loaded, k_loaded, v_loaded, seg_loaded, k_consumed, v_consumed,
     schedule) = barriers
    batch = lax.axis_index(BATCH_AXIS)
    head = lax.axis_index(HEAD_AXIS)
    wg = lax.axis_index(WARPGROUP_AXIS)
    cta_first = lax.axis_index(Q_AXIS) * (wgs * bq)
    steps, unmasked = kv_steps(st, cta_first, wgs * bq, bkv)

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
          s = hide(st, s, first, j * bkv, q_ids, kv_ids, q_axis=0, tail=tail)
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

      carry = (zeros_acc(bq, d), row_vector(-jnp.inf, bq), row_vector(0.0, bq))
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

  tiles = tile_transforms()
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
  return launch(
      kernel, st, name="fusedlm_mosaic_fwd",
      out_type=(jax.ShapeDtypeStruct((b, q_pad, h, d), dtype),
                jax.ShapeDtypeStruct((b, h, q_pad), jnp.float32)),
      scratch_types=(scratch, barriers),
      grid=(h, q_pad // (wgs * bq), b), grid_names=(HEAD_AXIS, Q_AXIS, BATCH_AXIS),
  )(*args)
