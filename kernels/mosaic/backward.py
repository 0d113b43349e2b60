"""The Mosaic GPU attention backward: a dQ kernel and a dK/dV kernel.

FlashAttention-2's Algorithm 2 on the forward's machinery (producer
warpgroup, TMA rings, two consumers); design: `kernels.mosaic.attention`.
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
  KV_AXIS,
  PRODUCER_REGISTERS,
  Q_AXIS,
  WARPGROUP_AXIS,
  MosaicStatic,
  hide,
  kv_steps,
  launch,
  masked_tail,
  q_steps,
  tile_transforms,
  zeros_acc,
)


def backward_dq(q, k, v, segments, do, lse, delta, st: MosaicStatic):
  """dQ [b, q_pad, h, d]: each CTA owns 2 * block_q_dq rows and streams K, V."""
  b, q_pad, h, d = q.shape
  bq, bkv = st.blocks.block_q_dq, st.blocks.block_kv_dq
  stages = st.blocks.num_stages_bwd
  wgs = COMPUTE_WARPGROUPS
  dtype = q.dtype
  c = st.score_scale
  tail = masked_tail(st, bkv)
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
    if st.has_segments:
      qseg_ref, kvseg_ref, dq_ref, scratch, barriers = rest
    else:
      dq_ref, scratch, barriers = rest
    (q_smem, do_smem, lse_smem, delta_smem, qseg_smem, k_smem, v_smem,
     kvseg_smem) = scratch
    rows_loaded, kv_loaded, consumed = barriers
    batch = lax.axis_index(BATCH_AXIS)
    head = lax.axis_index(HEAD_AXIS)
    wg = lax.axis_index(WARPGROUP_AXIS)
    cta_first = lax.axis_index(Q_AXIS) * (wgs * bq)
    steps, unmasked = kv_steps(st, cta_first, wgs * bq, bkv)

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
          s = hide(st, s, first, j * bkv, q_ids, kv_ids, q_axis=0, tail=tail)
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
                             zeros_acc(bq, d))
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

  tiles = tile_transforms()
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
  return launch(
      kernel, st, name="fusedlm_mosaic_bwd_dq",
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=(scratch, barriers),
      grid=(h, q_pad // (wgs * bq), b), grid_names=(HEAD_AXIS, Q_AXIS, BATCH_AXIS),
  )(*args)


def backward_dkv(q, k, v, segments, do, lse, delta, st: MosaicStatic):
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
    batch = lax.axis_index(BATCH_AXIS)
    kv_head = lax.axis_index(HEAD_AXIS)
    wg = lax.axis_index(WARPGROUP_AXIS)
    cta_first = lax.axis_index(KV_AXIS) * (wgs * bkv)
    first, unmasked_from, end = q_steps(st, cta_first, wgs * bkv, bq)
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
          s_t = hide(st, s_t, i * bq, key_first, q_ids, kv_ids, q_axis=1,
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
            (plgpu.ACC.init(dv_acc), plgpu.ACC.init(zeros_acc(*shape))))
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

      zeros = zeros_acc(bkv, d)
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

  tiles = tile_transforms()
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
  return launch(
      kernel, st, name="fusedlm_mosaic_bwd_dkv",
      out_type=(kv_shape, kv_shape),
      scratch_types=(scratch, barriers),
      grid=(hkv, kv_pad // (wgs * bkv), b), grid_names=(HEAD_AXIS, KV_AXIS, BATCH_AXIS),
  )(*args)
