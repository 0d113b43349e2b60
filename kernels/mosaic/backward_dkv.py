"""The Mosaic GPU dK/dV kernel (FlashAttention-2's Algorithm 2, the dK/dV half).

Each CTA owns keys of one K/V head and streams Q, dO, L and D tiles of
every query head of its group, so GQA sums in the accumulators and K/V are
never repeated. It works on transposed tiles (S^T = K Q^T, keys as rows), so
every product has M = 64 rows. Two layouts (`Dims.dkv_roles`):

  * keys: each consumer owns block_kv_dkv keys and holds their dK and dV
    (4 tile products per tile pair: S, dP, dV, dK);
  * roles: both share block_kv_dkv keys. One computes S and P and holds dV;
    it hands dS's factor P (times the soft-cap's derivative) to the other
    through a shared-memory ring (`p`, `p_ready`), which computes dP and dS
    and holds dK: still 4 products per pair, half the keys per CTA. For
    head dims over 128, where dK and dV do not fit one consumer, and for
    the variants whose tiles crowd them out at 128.

With `MosaicBlockSizes.dq_atomic` (tuning step M5; keys layout, no bias) the
consumers also take dQ's share of their keys, dS K for the query tile of
each step: dS^T goes to shared memory, where wgmma reads it transposed as
its left operand, and the float32 [block_q_dkv, d] product is added into
`dq_sum` in global memory by a TMA reduce-add (cp.reduce.async.bulk). The
dQ kernel, which recomputes S and dP, then does not run. Past head dim 64
(`tiles.dq_share_split`) the consumers split dQ's columns instead of its
keys: after a barrier (`ds_ready`) each multiplies both consumers' dS^T,
double-buffered, by its half of K's columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fusedlm.kernels.mosaic.bounds import q_range
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
  KV_AXIS,
  PRODUCER_REGISTERS,
  WARPGROUP_AXIS,
  MosaicStatic,
  bias_index,
  dq_in_dkv,
  dq_share_split,
  launch,
  tile_transforms,
  zeros_acc,
)

DK, DV = "dk", "dv"


def backward_dkv(q, k, v, segments, bias_t, seed, do, lse, delta, st: MosaicStatic,
                 dq_sum=None):
  """dK [b, kv_pad, kv_heads, d], dV [b, kv_pad, kv_heads, dv] from padded
  inputs. bias_t: the bias transposed, [b|1, h|1, kv_pad, q_pad], or None;
  delta already holds - d lse. dq_sum: None, or (with dq_in_dkv) a float32
  Ref [b, q_pad, h, d] of zeros, to which the kernel adds dS K (dQ before
  the softmax scale)."""
  b, q_pad, h, d = q.shape
  kv_pad, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  bq, bkv = st.blocks.block_q_dkv, st.blocks.block_kv_dkv
  stages = st.blocks.num_stages_bwd
  wgs, roles = COMPUTE_WARPGROUPS, st.dims.dkv_roles
  key_sets = 1 if roles else wgs  # blocks of keys a CTA owns
  # Tuning step M6: the consumers take turns at the tensor cores (S and dP,
  # then dV and dK), as the forward's do; in the keys layout only.
  pingpong = bool(st.blocks.bwd_pingpong) and not roles
  dtype = q.dtype
  has_bias, dropout = bias_t is not None, seed is not None
  with_dq = dq_sum is not None
  if with_dq and not dq_in_dkv(st.blocks, st.dims, st.var, st.causal):
    raise ValueError("dq_sum needs MosaicBlockSizes.dq_atomic in the keys layout")
  # Split dQ share: consumer c adds the CTA's dS K[:, c-th half] (see above).
  split = with_dq and dq_share_split(st.dims)
  dq_cols = d // wgs if split else d
  ds_buffers = 2 if split else 1
  col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per query column

  def kernel(*refs):
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    inputs = refs[6:-4]
    dk_ref, dv_ref, smem, bar = refs[-4:]
    dq_ref = inputs.pop() if with_dq else None
    qseg_ref, kvseg_ref = inputs[:2] if st.has_segments else (None, None)
    bias_ref = inputs[2 * st.has_segments] if has_bias else None
    seed_ref = inputs[-1] if dropout else None
    batch = lax.axis_index(BATCH_AXIS)
    kv_head = lax.axis_index(HEAD_AXIS)
    wg = lax.axis_index(WARPGROUP_AXIS)
    cta_first = lax.axis_index(KV_AXIS) * (key_sets * bkv)
    rng = q_range(st, cta_first, key_sets * bkv, bq)
    per_head = rng.steps
    steps = st.group * per_head

    def sync_turn():
      plgpu.barrier_arrive(bar["schedule"])
      plgpu.barrier_wait(bar["schedule"])

    def consumer(jobs):
      """The loop of a consumer that accumulates `jobs` (DK and/or DV)."""
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      ks = 0 if roles else wg  # this consumer's block of keys
      key_first = cta_first + ks * bkv
      keys = (batch, pl.ds(key_first, bkv), kv_head)
      loaded = bar["keys"].at[ks]

      def issue_key_loads():
        plgpu.copy_gmem_to_smem(k_ref.at[keys], smem["k"].at[ks], loaded)
        plgpu.copy_gmem_to_smem(v_ref.at[keys], smem["v"].at[ks], loaded)
        if st.has_segments:
          plgpu.copy_gmem_to_smem(kvseg_ref.at[batch, pl.ds(key_first, bkv)],
                                  smem["kv_ids"].at[ks], loaded)
      if roles:
        pl.when(wg == 0)(issue_key_loads)
      else:
        issue_key_loads()
      plgpu.barrier_wait(loaded)
      kv_ids = (plgpu.load(smem["kv_ids"].at[ks], layout=plgpu.Layout.WGMMA.reduce(1))
                if st.has_segments else None)
      shape = (bkv, bq)  # transposed tiles: keys are rows, queries columns

      def step(t, i, head, accs, *, masked: bool):
        slot = lax.rem(t, jnp.int32(stages))
        plgpu.barrier_wait(bar["rows"].at[slot])
        accs, keep, p_ds = dict(accs), None, None
        # This step's dS^T buffer (with dq_atomic; P waits there first, split).
        ds = smem["ds"].at[lax.rem(t, ds_buffers)] if with_dq else None
        # The dropout bits are drawn while a product runs (S's, or dP's on the
        # dK consumer of the roles layout).
        mask = lambda: (dropout_mask(st, seed_ref, batch, head, i * bq, key_first,
                                     shape, q_axis=1) if dropout else None)

        def s_product(acc_ref):
          plgpu.wgmma(acc_ref, smem["k"].at[ks], smem["q"].at[slot].transpose((1, 0)))

        def dp_product(acc_ref):
          plgpu.wgmma(acc_ref, smem["v"].at[ks], smem["do"].at[slot].transpose((1, 0)))

        if pingpong:  # S and dP in one turn at the tensor cores
          def s_and_dp(s_ref, dp_ref):
            s_product(s_ref)
            dp_product(dp_ref)
            sync_turn()  # let the other consumer issue while ours run
            return s_ref[...], dp_ref[...], mask()
          s_t, dp_t, keep = pl.run_scoped(s_and_dp, plgpu.ACC(shape, jnp.float32),
                                          plgpu.ACC(shape, jnp.float32))

        if DV in jobs:  # the softmax side: S, P, dV
          if not pingpong:
            def scores(acc_ref):
              s_product(acc_ref)
              return acc_ref[...], mask()
            s_t, keep = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
          bias_tile = (plgpu.load(smem["bias"].at[slot, ks], layout=plgpu.Layout.WGMMA)
                       if has_bias else None)
          x_t, factor, cap_grad = logits(st, s_t, bias_tile)
          if masked:
            q_ids = (plgpu.load(smem["q_ids"].at[slot], layout=col_layout)
                     if st.has_segments else None)
            x_t = hide(st, x_t, i * bq, key_first, q_ids, kv_ids, q_axis=1,
                       tail=False)
          lse = plgpu.load(smem["lse"].at[slot], layout=col_layout)
          p_t = jnp.exp2(scaled(x_t, factor) - lax.broadcast_in_dim(lse, shape, [1]))
          # P is kept only in the input dtype: dV's product takes it so, and
          # dS = P (dP - D) from it is rounded to that dtype for dK's product
          # anyway. The float32 copy (32 registers a thread) made this kernel,
          # which holds dK and dV, spill at head dim 128. The soft-cap's
          # derivative is folded into dS's factor for the same reason.
          p16 = p_t.astype(dtype)
          p_ds = p16 if cap_grad is None else (p_t * cap_grad).astype(dtype)
          if DK not in jobs:  # hand dS's factor to the dK consumer
            smem["p"].at[slot][...] = p_ds
            plgpu.barrier_arrive(bar["p_ready"].at[slot])
          # dV takes the kept P; its 1 / (1 - rate) comes at the end.
          p_dv = dropped(st, p16, keep) if dropout else p16
          if split:
            # P waits in dS^T's buffer (dS comes later), so that its 16
            # registers are free while dV's and dP's products run beside
            # dK and dV: that peak spilled at head dim 128. (The layout has
            # no dropout or soft-cap here: P is both dV's and dS's factor.)
            ds[wg] = p16
            plgpu.commit_smem()
            p_dv = p_ds = ds.at[wg]

        def dv_product(acc_ref):
          plgpu.wgmma(acc_ref, p_dv, smem["do"].at[slot])

        if pingpong:
          pass  # dP is in; dV's product goes with dK's, in the next turn
        elif DK in jobs and DV in jobs:
          def dv_and_dp(refs):  # one wgmma wait for the pair
            dv_product(refs[0])
            dp_product(refs[1])
          accs[DV], dp_t = pl.run_state(dv_and_dp)(
              (plgpu.ACC.init(accs[DV]), plgpu.ACC.init(zeros_acc(*shape))))
        elif DV in jobs:
          accs[DV] = pl.run_state(dv_product)(plgpu.ACC.init(accs[DV]))
        else:
          def dp_and_mask(acc_ref):
            dp_product(acc_ref)
            return acc_ref[...], mask()
          dp_t, keep = pl.run_scoped(dp_and_mask, plgpu.ACC(shape, jnp.float32))
        if DK in jobs:
          if p_ds is None:  # from the dV consumer
            plgpu.barrier_wait(bar["p_ready"].at[slot])
            p_ds = plgpu.load(smem["p"].at[slot], layout=plgpu.Layout.WGMMA)
          elif split:  # back from shared memory, now that dV's product is done
            p_ds = plgpu.load(p_ds, layout=plgpu.Layout.WGMMA)
          if dropout:
            dp_t = dropped(st, dp_t, keep) * keep_scale(st)
          delta = lax.broadcast_in_dim(
              plgpu.load(smem["delta"].at[slot], layout=col_layout), shape, [1])
          ds_t = p_ds.astype(jnp.float32) * (dp_t - delta)

          ds16 = ds_t.astype(dtype)
          if with_dq:  # dQ's left operand dS is read transposed from here
            ds[wg] = ds16
            plgpu.commit_smem()
            if split:  # the other consumer's dQ product reads it too
              plgpu.barrier_arrive(bar["ds_ready"])

          def dk_product(acc_ref):
            plgpu.wgmma(acc_ref, ds16, smem["q"].at[slot])
          if split:  # dK's and dQ's products under one wgmma wait
            accs[DK], dq_share = split_dk_and_dq_products(ds, slot, accs[DK])
          elif pingpong:
            plgpu.barrier_arrive(bar["schedule"])  # P, dS done: the other may multiply
            plgpu.barrier_wait(bar["schedule"])  # the tensor cores are ours again
            def dv_and_dk(refs):  # one wgmma wait for the pair
              dv_product(refs[0])
              dk_product(refs[1])
            accs[DV], accs[DK] = pl.run_state(dv_and_dk)(
                (plgpu.ACC.init(accs[DV]), plgpu.ACC.init(accs[DK])))
          else:
            accs[DK] = pl.run_state(dk_product)(plgpu.ACC.init(accs[DK]))
        plgpu.barrier_arrive(bar["rows_consumed"].at[slot])  # the products are done
        if with_dq:
          if not split:  # dS K of this consumer's keys: reads no ring slot
            def dq_product(acc_ref):
              plgpu.wgmma(acc_ref, ds.at[wg].transpose((1, 0)), smem["k"].at[ks])
              return acc_ref[...]
            dq_share = pl.run_scoped(dq_product, plgpu.ACC((bq, d), jnp.float32))
          add_dq_share(dq_share, i, head)
        return accs

      def split_dk_and_dq_products(ds, slot, dk_acc):
        """dK += dS^T Q, and the [bq, d / 2] float32 dQ share: dS K of the
        CTA's keys and this consumer's half of the columns. Both read dS^T
        from shared memory, so no tile of it is in registers while they run
        (at head dim 128 that spilled)."""
        def products(refs):
          dk_ref, dq_ref = refs
          plgpu.wgmma(dk_ref, ds.at[wg], smem["q"].at[slot])
          # Both dS^T tiles are in. This buffer is rewritten two steps on,
          # after the other consumer's next arrival, so after its product.
          plgpu.barrier_wait(bar["ds_ready"])
          for r in range(wgs):
            plgpu.wgmma(dq_ref, ds.at[r].transpose((1, 0)),
                        smem["k"].at[r, :, pl.ds(wg * dq_cols, dq_cols)])
        return pl.run_state(products)(
            (plgpu.ACC.init(dk_acc), plgpu.ACC.init(zeros_acc(bq, dq_cols))))

      def add_dq_share(share, i, head):
        """dQ[rows of tile i] += share, by a TMA reduce-add."""
        # The previous tile's reduce-add must have read its shared memory.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        smem["dq"].at[wg][...] = share
        plgpu.commit_smem()
        cols = pl.ds(wg * dq_cols, dq_cols) if split else slice(None)
        plgpu.copy_smem_to_gmem(smem["dq"].at[wg],
                                dq_ref.at[batch, pl.ds(i * bq, bq), head, cols],
                                reduction_op="add")

      def head_loop(g, accs):
        base = g * per_head - rng.lo  # step number of tile i is base + i
        head = kv_head * st.group + g
        run = lambda lo, hi, accs, masked: lax.fori_loop(
            lo, hi, lambda i, a: step(base + i, i, head, a, masked=masked), accs)
        if rng.lead:
          accs = run(rng.lo, rng.a, accs, True)
        if not st.has_segments:
          accs = run(rng.a, rng.b, accs, False)
        if rng.trail:
          accs = run(rng.b, rng.hi, accs, True)
        return accs

      widths = {DK: d, DV: dv}
      if pingpong:  # wg 1 starts half a turn after wg 0
        pl.when(wg == 1)(sync_turn)
      accs = lax.fori_loop(0, st.group, head_loop,
                           {job: zeros_acc(bkv, widths[job]) for job in jobs})
      if pingpong:
        pl.when(wg == 0)(sync_turn)
      if roles or split:  # the other consumer may still be reading K and V
        plgpu.barrier_arrive(bar["done"])
        plgpu.barrier_wait(bar["done"])
      # The K and V tiles are read by no pending product: reuse them.
      out_smem = {DK: smem["k"].at[ks], DV: smem["v"].at[ks]}
      if DK in jobs:
        out_smem[DK][...] = (accs[DK] * st.scale).astype(dtype)
      if DV in jobs:
        dv_acc = accs[DV] * keep_scale(st) if dropout else accs[DV]
        out_smem[DV][...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      for job, out_ref in ((DK, dk_ref), (DV, dv_ref)):
        if job in jobs:
          plgpu.copy_smem_to_gmem(out_smem[job], out_ref.at[keys])
      plgpu.wait_smem_to_gmem(0)

    if roles:
      pl.when(wg == 0)(lambda: consumer((DV,)))
      pl.when(wg == 1)(lambda: consumer((DK,)))
    else:
      pl.when(wg < wgs)(lambda: consumer((DK, DV)))

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

      @pl.loop(0, steps)
      def _(t):
        slot = lax.rem(t, jnp.int32(stages))
        g = lax.div(t, jnp.maximum(per_head, 1))
        i = rng.lo + t - g * per_head
        head = kv_head * st.group + g
        rows = (batch, pl.ds(i * bq, bq), head)
        row_vec = (batch, head, pl.ds(i * bq, bq))
        @pl.when(t >= stages)
        def _():
          plgpu.barrier_wait(bar["rows_consumed"].at[slot])
        loaded = bar["rows"].at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[rows], smem["q"].at[slot], loaded)
        plgpu.copy_gmem_to_smem(do_ref.at[rows], smem["do"].at[slot], loaded)
        plgpu.copy_gmem_to_smem(lse_ref.at[row_vec], smem["lse"].at[slot], loaded)
        plgpu.copy_gmem_to_smem(delta_ref.at[row_vec], smem["delta"].at[slot], loaded)
        if st.has_segments:
          plgpu.copy_gmem_to_smem(qseg_ref.at[batch, pl.ds(i * bq, bq)],
                                  smem["q_ids"].at[slot], loaded)
        if has_bias:
          bias_batch, bias_head = bias_index(st, batch, head)
          for r in range(key_sets):
            tile = (bias_batch, bias_head, pl.ds(cta_first + r * bkv, bkv),
                    pl.ds(i * bq, bq))
            plgpu.copy_gmem_to_smem(bias_ref.at[tile], smem["bias"].at[slot, r],
                                    loaded)

  tiles = tile_transforms()
  smem = {
      "k": plgpu.SMEM((key_sets, bkv, d), dtype, transforms=tiles),  # then dK
      "v": plgpu.SMEM((key_sets, bkv, dv), dtype, transforms=tiles),  # then dV
      "kv_ids": plgpu.SMEM((key_sets, bkv), jnp.int32),
      "q": plgpu.SMEM((stages, bq, d), dtype, transforms=tiles),
      "do": plgpu.SMEM((stages, bq, dv), dtype, transforms=tiles),
      "lse": plgpu.SMEM((stages, bq), jnp.float32),
      "delta": plgpu.SMEM((stages, bq), jnp.float32),
      "q_ids": plgpu.SMEM((stages, bq), jnp.int32),
  }
  if has_bias:
    smem["bias"] = plgpu.SMEM((stages, key_sets, bkv, bq), bias_t.dtype)
  if roles:  # dS's factor P, from the dV consumer to the dK consumer
    smem["p"] = plgpu.SMEM((stages, bkv, bq), dtype)
  if with_dq:  # each consumer's dS^T, and its float32 dQ share on its way out
    smem["ds"] = plgpu.SMEM((ds_buffers, wgs, bkv, bq), dtype, transforms=tiles)
    smem["dq"] = plgpu.SMEM((wgs, bq, dq_cols), jnp.float32,
                            transforms=(plgpu.TilingTransform((8, 32)),
                                        plgpu.SwizzleTransform(128)))
  key_copies = 2 + st.has_segments
  row_copies = 4 + st.has_segments + key_sets * has_bias
  bar = {
      "keys": plgpu.Barrier(num_arrivals=key_copies, num_barriers=key_sets),
      "rows": plgpu.Barrier(num_arrivals=row_copies, num_barriers=stages),
      "rows_consumed": plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  }
  if roles or split:
    bar["done"] = plgpu.Barrier(num_arrivals=wgs)
  if roles:
    bar["p_ready"] = plgpu.Barrier(num_barriers=stages)
  if split:
    bar["ds_ready"] = plgpu.Barrier(num_arrivals=wgs)
  if pingpong:
    bar["schedule"] = plgpu.Barrier(num_arrivals=wgs)
  args = [q, k, v, do, lse, delta] + (list(segments) if st.has_segments else [])
  args += ([bias_t] if has_bias else []) + ([seed] if dropout else [])
  args += [dq_sum] if with_dq else []
  return launch(
      kernel, st, name="fusedlm_mosaic_bwd_dkv",
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
      scratch_types=(smem, bar),
      grid=(hkv, kv_pad // (key_sets * bkv), b), grid_names=(HEAD_AXIS, KV_AXIS, BATCH_AXIS),
  )(*args)
