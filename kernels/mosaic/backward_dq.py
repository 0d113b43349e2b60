"""The Mosaic GPU dQ kernel (FlashAttention-2's Algorithm 2, the dQ half), and d bias.

Each CTA owns query rows of one head and streams K and V tiles like the
forward. Two layouts (`Dims.parts`):

  * parts 1 (head dims up to 128): each consumer owns block_q_dq rows and
    holds their dQ accumulator;
  * parts 2: both consumers share block_q_dq rows, recompute the same S and
    dP, and each holds one half of dQ's head dim; every tile is stored as two
    halves, so each half is a whole swizzled tile for wgmma and TMA.

With a bias, dS (d loss / d biased logit) is written tile by tile as d bias
[b, h, q_pad, kv_pad] float32; tiles the CTA skips are left unwritten, and
the caller zeroes them with the mask (all their pairs are hidden).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fusedlm.kernels.mosaic.bounds import kv_range, masked_tail
from fusedlm.kernels.mosaic.logits import (
  dropout_mask,
  dropped,
  hide,
  keep_scale,
  logits,
  scaled,
)
from fusedlm.kernels.mosaic.tiles import (
  BATCH_AXIS,
  COMPUTE_WARPGROUPS,
  CONSUMER_REGISTERS,
  HEAD_AXIS,
  Q_AXIS,
  PRODUCER_REGISTERS,
  WARPGROUP_AXIS,
  MosaicStatic,
  bias_index,
  launch,
  tile_transforms,
  zeros_acc,
)


def backward_dq(q, k, v, segments, bias, seed, do, lse, delta, st: MosaicStatic):
  """dQ [b, q_pad, h, d] (q.dtype), and d bias [b, h, q_pad, kv_pad] float32
  (None without a bias), from padded inputs; delta already holds - d lse."""
  b, q_pad, h, d = q.shape
  kv_pad, dv = k.shape[1], v.shape[3]
  bq, bkv = st.blocks.block_q_dq, st.blocks.block_kv_dq
  stages = st.blocks.num_stages_bwd
  wgs, parts = COMPUTE_WARPGROUPS, st.dims.parts
  row_sets = wgs if parts == 1 else 1  # blocks of rows a CTA owns
  dp_, dvp = d // parts, dv // parts  # head-dim part widths
  dtype = q.dtype
  tail = masked_tail(st, bkv)
  has_bias, dropout = bias is not None, seed is not None
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  # A float32 bias tile is dS's size: its ring slot stages the d bias store
  # (the slot is released once the store has read it), which is what lets
  # head dim 128 fit.
  ds_in_bias_slot = has_bias and bias.dtype == jnp.float32 and parts == 1
  # Tuning step M6: the consumers take turns at the tensor cores (S and dP,
  # then dQ), as the forward's do; only where they run the same steps.
  pingpong = bool(st.blocks.bwd_pingpong) and parts == 1

  def kernel(*refs):
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    n_out = 2 if has_bias else 1
    inputs, outputs = refs[6:-2 - n_out], refs[-2 - n_out:-2]
    smem, bar = refs[-2:]
    dq_ref = outputs[0]
    dbias_ref = outputs[1] if has_bias else None
    qseg_ref, kvseg_ref = inputs[:2] if st.has_segments else (None, None)
    bias_ref = inputs[2 * st.has_segments] if has_bias else None
    seed_ref = inputs[-1] if dropout else None
    batch = lax.axis_index(BATCH_AXIS)
    head = lax.axis_index(HEAD_AXIS)
    wg = lax.axis_index(WARPGROUP_AXIS)
    cta_first = lax.axis_index(Q_AXIS) * (row_sets * bq)
    rng = kv_range(st, cta_first, row_sets * bq, bkv)

    def sync_turn():
      plgpu.barrier_arrive(bar["schedule"])
      plgpu.barrier_wait(bar["schedule"])

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      rs = wg if parts == 1 else 0  # this consumer's block of rows
      own = 0 if parts == 1 else wg  # the head-dim part of dQ it holds
      first = cta_first + rs * bq
      row_vec = (batch, head, pl.ds(first, bq))
      loaded = bar["rows"].at[rs]

      def issue_row_loads():
        for p in range(parts):
          cols = (batch, pl.ds(first, bq), head)
          plgpu.copy_gmem_to_smem(q_ref.at[cols + (pl.ds(p * dp_, dp_),)],
                                  smem["q"].at[rs, p], loaded)
          plgpu.copy_gmem_to_smem(do_ref.at[cols + (pl.ds(p * dvp, dvp),)],
                                  smem["do"].at[rs, p], loaded)
        plgpu.copy_gmem_to_smem(lse_ref.at[row_vec], smem["lse"].at[rs], loaded)
        plgpu.copy_gmem_to_smem(delta_ref.at[row_vec], smem["delta"].at[rs], loaded)
        if st.has_segments:
          plgpu.copy_gmem_to_smem(qseg_ref.at[batch, pl.ds(first, bq)],
                                  smem["q_ids"].at[rs], loaded)
      if parts == 1:
        issue_row_loads()
      else:
        pl.when(wg == 0)(issue_row_loads)
      plgpu.barrier_wait(loaded)
      lse = plgpu.load(smem["lse"].at[rs], layout=row_layout)
      delta = plgpu.load(smem["delta"].at[rs], layout=row_layout)
      q_ids = (plgpu.load(smem["q_ids"].at[rs], layout=row_layout)
               if st.has_segments else None)

      def step(j, dq_acc, *, masked: bool):
        slot = lax.rem(j - rng.lo, jnp.int32(stages))
        plgpu.barrier_wait(bar["kv"].at[slot])
        shape = (bq, bkv)

        def s_product(acc_ref):
          for p in range(parts):
            plgpu.wgmma(acc_ref, smem["q"].at[rs, p],
                        smem["k"].at[slot, p].transpose((1, 0)))

        def dp_product(acc_ref):
          for p_ in range(parts):
            plgpu.wgmma(acc_ref, smem["do"].at[rs, p_],
                        smem["v"].at[slot, p_].transpose((1, 0)))

        # The dropout bits are drawn while a product runs.
        mask = lambda: (dropout_mask(st, seed_ref, batch, head, first, j * bkv,
                                     shape, q_axis=0) if dropout else None)
        if pingpong:  # S and dP in one turn at the tensor cores
          def s_and_dp(s_ref, dp_ref):
            s_product(s_ref)
            dp_product(dp_ref)
            sync_turn()  # let the other consumer issue while ours run
            return s_ref[...], dp_ref[...], mask()
          s, dp, keep = pl.run_scoped(s_and_dp, plgpu.ACC(shape, jnp.float32),
                                      plgpu.ACC(shape, jnp.float32))
        else:
          def scores(acc_ref):
            s_product(acc_ref)
            return acc_ref[...], mask()
          s, keep = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
        bias_tile = (plgpu.load(smem["bias"].at[slot, rs], layout=plgpu.Layout.WGMMA)
                     if has_bias else None)
        x, factor, cap_grad = logits(st, s, bias_tile)
        if masked:
          kv_ids = (plgpu.load(smem["kv_ids"].at[slot],
                               layout=plgpu.Layout.WGMMA.reduce(0))
                    if st.has_segments else None)
          x = hide(st, x, first, j * bkv, q_ids, kv_ids, q_axis=0, tail=tail)
        # L = +inf on a row that sees no key, so P = 0 there.
        p = jnp.exp2(scaled(x, factor) - lax.broadcast_in_dim(lse, shape, [0]))

        if not pingpong:
          def dp_scope(acc_ref):
            dp_product(acc_ref)
            return acc_ref[...]
          dp = pl.run_scoped(dp_scope, plgpu.ACC(shape, jnp.float32))
        if dropout:
          dp = dropped(st, dp, keep) * keep_scale(st)
        ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))
        if cap_grad is not None:
          ds = ds * cap_grad
        if has_bias:
          write_dbias(ds, j)
        if pingpong:
          plgpu.barrier_arrive(bar["schedule"])  # dS done: the other may multiply
          plgpu.barrier_wait(bar["schedule"])  # the tensor cores are ours again

        def dq_product(acc_ref):
          plgpu.wgmma(acc_ref, ds.astype(dtype), smem["k"].at[slot, own])
        dq_acc = pl.run_state(dq_product)(plgpu.ACC.init(dq_acc))
        if ds_in_bias_slot:  # the dS store must have read the slot
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        # run_state read the accumulator back, which waited for the product:
        # nothing reads the slot any more.
        plgpu.barrier_arrive(bar["kv_consumed"].at[slot])
        return dq_acc

      def write_dbias(ds, j):
        def store():
          if ds_in_bias_slot:
            # The bias tile is in registers: its float32 slot takes dS.
            buffer = smem["bias"].at[lax.rem(j - rng.lo, jnp.int32(stages)), rs]
          else:
            buffer = smem["ds"].at[rs]
            # The previous tile's store must have read the buffer.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          buffer[...] = ds
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              buffer, dbias_ref.at[batch, head, pl.ds(first, bq), pl.ds(j * bkv, bkv)])
        if parts == 1:
          store()
        else:  # both consumers hold the same dS
          pl.when(wg == 0)(store)

      dq_acc = zeros_acc(bq, dp_)
      loop = lambda lo, hi, masked, carry: lax.fori_loop(
          lo, hi, functools.partial(step, masked=masked), carry)
      if pingpong:  # wg 1 starts half a turn after wg 0
        pl.when(wg == 1)(sync_turn)
      if rng.lead:
        dq_acc = loop(rng.lo, rng.a, True, dq_acc)
      if not st.has_segments:
        dq_acc = loop(rng.a, rng.b, False, dq_acc)
      if rng.trail:
        dq_acc = loop(rng.b, rng.hi, True, dq_acc)
      if pingpong:
        pl.when(wg == 0)(sync_turn)
      if parts > 1:  # the other consumer may still be reading Q
        plgpu.barrier_arrive(bar["done"])
        plgpu.barrier_wait(bar["done"])
      # dS is in the units of the scaled scores: dQ = scale dS K.
      out = smem["q"].at[rs, own]
      out[...] = (dq_acc * st.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          out, dq_ref.at[batch, pl.ds(first, bq), head, pl.ds(own * dp_, dp_)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
      kv_head = lax.div(head, jnp.int32(st.group))
      bias_batch, bias_head = bias_index(st, batch, head) if has_bias else (0, 0)

      @pl.loop(0, rng.steps)
      def _(t):
        slot = lax.rem(t, jnp.int32(stages))
        j = rng.lo + t
        keys = (batch, pl.ds(j * bkv, bkv), kv_head)
        loaded = bar["kv"].at[slot]
        @pl.when(t >= stages)
        def _():
          plgpu.barrier_wait(bar["kv_consumed"].at[slot])
        for p in range(parts):
          plgpu.copy_gmem_to_smem(k_ref.at[keys + (pl.ds(p * dp_, dp_),)],
                                  smem["k"].at[slot, p], loaded)
          plgpu.copy_gmem_to_smem(v_ref.at[keys + (pl.ds(p * dvp, dvp),)],
                                  smem["v"].at[slot, p], loaded)
        if st.has_segments:
          plgpu.copy_gmem_to_smem(kvseg_ref.at[batch, pl.ds(j * bkv, bkv)],
                                  smem["kv_ids"].at[slot], loaded)
        if has_bias:
          for r in range(row_sets):
            tile = (bias_batch, bias_head, pl.ds(cta_first + r * bq, bq),
                    pl.ds(j * bkv, bkv))
            plgpu.copy_gmem_to_smem(bias_ref.at[tile], smem["bias"].at[slot, r],
                                    loaded)

  tiles = tile_transforms()
  smem = {
      "q": plgpu.SMEM((row_sets, parts, bq, dp_), dtype, transforms=tiles),  # then dQ
      "do": plgpu.SMEM((row_sets, parts, bq, dvp), dtype, transforms=tiles),
      "lse": plgpu.SMEM((row_sets, bq), jnp.float32),
      "delta": plgpu.SMEM((row_sets, bq), jnp.float32),
      "q_ids": plgpu.SMEM((row_sets, bq), jnp.int32),
      "k": plgpu.SMEM((stages, parts, bkv, dp_), dtype, transforms=tiles),
      "v": plgpu.SMEM((stages, parts, bkv, dvp), dtype, transforms=tiles),
      "kv_ids": plgpu.SMEM((stages, bkv), jnp.int32),
  }
  if has_bias:
    smem["bias"] = plgpu.SMEM((stages, row_sets, bq, bkv), bias.dtype)
    if not ds_in_bias_slot:
      smem["ds"] = plgpu.SMEM((row_sets, bq, bkv), jnp.float32)
  row_copies = 2 * parts + 2 + st.has_segments
  kv_copies = 2 * parts + st.has_segments + row_sets * has_bias
  bar = {
      "rows": plgpu.Barrier(num_arrivals=row_copies, num_barriers=row_sets),
      "kv": plgpu.Barrier(num_arrivals=kv_copies, num_barriers=stages),
      "kv_consumed": plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  }
  if parts > 1:
    bar["done"] = plgpu.Barrier(num_arrivals=wgs)
  if pingpong:
    bar["schedule"] = plgpu.Barrier(num_arrivals=wgs)
  args = [q, k, v, do, lse, delta] + (list(segments) if st.has_segments else [])
  args += ([bias] if has_bias else []) + ([seed] if dropout else [])
  out_type = [jax.ShapeDtypeStruct(q.shape, dtype)]
  if has_bias:
    out_type.append(jax.ShapeDtypeStruct((b, h, q_pad, kv_pad), jnp.float32))
  result = launch(
      kernel, st, name="fusedlm_mosaic_bwd_dq",
      out_type=tuple(out_type),
      scratch_types=(smem, bar),
      grid=(h, q_pad // (row_sets * bq), b), grid_names=(HEAD_AXIS, Q_AXIS, BATCH_AXIS),
  )(*args)
  return result[0], (result[1] if has_bias else None)
