"""The Mosaic GPU attention forward: one CTA per 2 x block_q query rows of one head.

Design and synchronisation: `kernels.mosaic.attention`'s docstring. The
variants enter through `kernels.mosaic.logits` (bias, soft-cap, window,
dropout) and the loop bounds of `kernels.mosaic.bounds` (window).

Two consumer loops share the softmax (`softmax`, `operand`):
  * `step` (the default): QK^T, softmax, PV, each product waited for
    before the next step;
  * `overlapped_step` (`MosaicBlockSizes.fwd_overlap`, tuning step M8): a
    first step only starts the pipeline (S_lo and its softmax); each step
    then issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} together, waits for
    S_j alone (`wgmma_accumulator_load(wait_n=1)`), takes its softmax while
    the PV product runs, and rescales O once it is done; `last_pv` adds the
    last tile's PV. P_{j-1} is the running product's register operand: S_j's
    P stays float32 inside that pipeline stage and is converted after it
    (ptxas serialises the products if an operand register is redefined
    between their issue and their wait, warning C7513). The ring's barrier
    waits stay one per phase: each step waits for its own K tile and the
    previous tile's V.
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
  CTA_AXIS,
  HEAD_AXIS,
  PRODUCER_REGISTERS,
  Q_AXIS,
  WARPGROUP_AXIS,
  MosaicStatic,
  bias_index,
  launch,
  row_vector,
  tile_transforms,
  zeros_acc,
)


def forward(q, k, v, segments, bias, seed, st: MosaicStatic):
  """out [b, q_pad, h, dv] (q.dtype) and L [b, h, q_pad] float32 (log2 units,
  +inf on a row that sees no key) from padded inputs.

  bias: [b|1, h|1, q_pad, kv_pad] or None; seed: [2] uint32 (dropout) or None.
  """
  b, q_pad, h, d = q.shape
  dv = v.shape[3]
  bq, bkv, stages = st.blocks.block_q, st.blocks.block_kv, st.blocks.num_stages
  wgs = COMPUTE_WARPGROUPS
  dtype = q.dtype
  tail = masked_tail(st, bkv)
  has_bias, dropout = bias is not None, seed is not None
  extras = st.has_segments or has_bias  # per-slot tiles beside K

  n_blocks = q_pad // (wgs * bq)  # blocks of rows per head
  persistent = st.blocks.persistent  # tuning step M7: 0, or the CTA count
  overlap = bool(st.blocks.fwd_overlap)  # tuning step M8

  def kernel(*refs):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    inputs = refs[3:-4]
    out_ref, lse_ref, smem, bar = refs[-4:]
    qseg_ref, kvseg_ref = inputs[:2] if st.has_segments else (None, None)
    bias_ref = inputs[2 * st.has_segments] if has_bias else None
    seed_ref = inputs[-1] if dropout else None
    wg = lax.axis_index(WARPGROUP_AXIS)

    def sync_turn():
      plgpu.barrier_arrive(bar["schedule"])
      plgpu.barrier_wait(bar["schedule"])

    def for_each_block(body):
      """body(batch, head, block, base) for the blocks of rows of this CTA.

      base: key tiles this CTA streamed before the block, which continue
      the ring's slots and barrier phases; body returns it plus the block's.
      """
      if not persistent:
        body(lax.axis_index(BATCH_AXIS), lax.axis_index(HEAD_AXIS),
             lax.axis_index(Q_AXIS), jnp.int32(0))
        return
      cta, blocks = lax.axis_index(CTA_AXIS), n_blocks * h * b
      def one(i, base):
        # Longest first: causal rows of the last blocks see the most keys.
        w = cta + i * persistent
        rest = lax.rem(w, jnp.int32(h * b))
        block = n_blocks - 1 - lax.div(w, jnp.int32(h * b))
        return body(lax.rem(rest, jnp.int32(b)), lax.div(rest, jnp.int32(b)),
                    block, base)
      count = lax.div(jnp.maximum(blocks - cta, 0) + persistent - 1,
                      jnp.int32(persistent))
      lax.fori_loop(0, count, one, jnp.int32(0))

    def consume(batch, head, block, base):
      cta_first = block * (wgs * bq)
      rng = kv_range(st, cta_first, wgs * bq, bkv)
      first = cta_first + wg * bq
      rows = (batch, pl.ds(first, bq), head)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], smem["q"].at[wg], bar["q"].at[wg])
      if st.has_segments:
        plgpu.copy_gmem_to_smem(qseg_ref.at[batch, pl.ds(first, bq)],
                                smem["q_ids"].at[wg], bar["q"].at[wg])
      plgpu.barrier_wait(bar["q"].at[wg])
      q_ids = (plgpu.load(smem["q_ids"].at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
               if st.has_segments else None)
      slot_of = lambda t: lax.rem(base + t, jnp.int32(stages))

      if not overlap:  # (the overlapped steps wait for each K tile themselves)
        @pl.when(rng.steps > 0)
        def _():
          plgpu.barrier_wait(bar["k"].at[slot_of(0)])

      # Offsets the two consumers by half a step: wg 1 waits for wg 0's
      # first product before issuing its own.
      pl.when(wg == 1)(sync_turn)

      def draw_dropout(j):
        return (dropout_mask(st, seed_ref, batch, head, first, j * bkv, (bq, bkv),
                             q_axis=0) if dropout else None)

      def softmax(s, j, slot, m, l, *, masked: bool):
        """P of key tile j (float32), the new row max and sum, and alpha, the
        factor taking what was summed before to the new max."""
        if extras:
          plgpu.barrier_wait(bar["extras"].at[slot])
        bias_tile = (plgpu.load(smem["bias"].at[slot, wg], layout=plgpu.Layout.WGMMA)
                     if has_bias else None)
        x, factor, _ = logits(st, s, bias_tile)
        if masked:
          kv_ids = (plgpu.load(smem["kv_ids"].at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    if st.has_segments else None)
          x = hide(st, x, first, j * bkv, q_ids, kv_ids, q_axis=0, tail=tail)
        # K and the slot's extras are read: the producer may refill them.
        plgpu.barrier_arrive(bar["k_consumed"].at[slot])

        m_new = jnp.maximum(m, scaled(x.max(axis=1), factor))
        # A row with no visible key so far keeps m = -inf; subtracting 0
        # instead keeps exp2 at 0 there rather than NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(scaled(x, factor) - lax.broadcast_in_dim(m_safe, x.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        return p, m_new, l, alpha

      def operand(p, keep):
        """P as the PV product's left operand: in the input dtype, and with
        dropout's zeros (after the row sum: the softmax is of the whole row)."""
        p = p.astype(dtype)
        return dropped(st, p, keep) if dropout else p

      def step(j, carry, *, masked: bool):
        acc, m, l = carry
        t = j - rng.lo
        slot = slot_of(t)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, smem["q"].at[wg], smem["k"].at[slot].transpose((1, 0)))
          sync_turn()  # let the other consumer issue while ours runs
          # The dropout bits are drawn while the product runs.
          return acc_ref[...], draw_dropout(j)
        s, keep = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        p, m_new, l, alpha = softmax(s, j, slot, m, l, masked=masked)
        p = operand(p, keep)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
        plgpu.barrier_arrive(bar["schedule"])  # softmax done: the other may multiply
        plgpu.barrier_wait(bar["v"].at[slot])
        plgpu.barrier_wait(bar["schedule"])  # the tensor cores are ours again
        # Computed out here: a concrete bound closed over by run_state's
        # body does not lower.
        has_next = t + 1 < rng.steps
        next_slot = slot_of(t + 1)

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p, smem["v"].at[slot])
          @pl.when(has_next)
          def _():
            plgpu.barrier_wait(bar["k"].at[next_slot])
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(bar["v_consumed"].at[slot])
        return acc, m_new, l

      def overlapped_step(j, carry, *, masked: bool, first_step: bool = False):
        """Tuning step M8: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}
        together, take S_j's softmax while the second product runs, then
        rescale O (FlashAttention-3's intra-warpgroup overlap)."""
        acc, m, l, p_prev = carry
        t = j - rng.lo
        slot, prev = slot_of(t), slot_of(t - 1)
        plgpu.barrier_wait(bar["k"].at[slot])
        if not first_step:
          plgpu.barrier_wait(bar["v"].at[prev])

        def with_s(s_ref):
          def body(refs):
            o_ref, p_ref, m_ref, l_ref, alpha_ref = refs
            plgpu.wgmma(s_ref, smem["q"].at[wg], smem["k"].at[slot].transpose((1, 0)))
            if not first_step:
              plgpu.wgmma(o_ref, p_prev, smem["v"].at[prev])
            sync_turn()  # let the other consumer issue while ours run
            # S_j is in; P_{j-1} V_{j-1} may still run. Its operand P_{j-1}
            # must not be redefined until it is done (ptxas serialises the
            # products otherwise), so S_j's P stays float32 in here.
            s = plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if first_step else 1)
            p_ref[...], m_ref[...], l_ref[...], alpha_ref[...] = softmax(
                s, j, slot, m_ref[...], l_ref[...], masked=masked)
          return pl.run_state(body)(
              (plgpu.ACC.init(acc), zeros_acc(bq, bkv), m, l, row_vector(1.0, bq)))
        acc, p, m, l, alpha = pl.run_scoped(with_s, plgpu.ACC((bq, bkv), jnp.float32))
        if not first_step:
          plgpu.barrier_arrive(bar["v_consumed"].at[prev])
        # Dropout's bits, drawn here: while the other consumer's products run.
        p = operand(p, draw_dropout(j))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        acc, l, m, p = lax.optimization_barrier((acc, l, m, p))
        plgpu.barrier_arrive(bar["schedule"])  # softmax done: the other may multiply
        plgpu.barrier_wait(bar["schedule"])  # the tensor cores are ours again
        return acc, m, l, p

      def last_pv(_, carry):
        """The last tile's O += P V, which no S product follows."""
        acc, m, l, p = carry
        slot = slot_of(rng.steps - 1)
        plgpu.barrier_wait(bar["v"].at[slot])

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p, smem["v"].at[slot])
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(bar["v_consumed"].at[slot])
        return acc, m, l, p

      carry = (zeros_acc(bq, dv), row_vector(-jnp.inf, bq), row_vector(0.0, bq))
      if overlap:
        carry += (jnp.zeros((bq, bkv), dtype),)
        step_fn = overlapped_step
        # The first tile (when there is one) only starts the pipeline: S and
        # its softmax, masked wherever any tile may need it.
        any_masked = rng.lead or rng.trail or st.has_segments
        carry = lax.fori_loop(
            rng.lo, jnp.minimum(rng.lo + 1, rng.hi),
            functools.partial(overlapped_step, masked=any_masked, first_step=True),
            carry)
        start = lambda x: jnp.maximum(x, rng.lo + 1)
      else:
        step_fn, start = step, lambda x: x
      loop = lambda lo, hi, masked, carry: lax.fori_loop(
          start(lo), start(hi), functools.partial(step_fn, masked=masked), carry)
      if rng.lead:
        carry = loop(rng.lo, rng.a, True, carry)
      if not st.has_segments:
        carry = loop(rng.a, rng.b, False, carry)
      if rng.trail:
        carry = loop(rng.b, rng.hi, True, carry)
      if overlap:
        carry = lax.fori_loop(0, jnp.minimum(rng.steps, 1), last_pv, carry)[:3]
      acc, m, l = carry
      pl.when(wg == 0)(sync_turn)

      seen = l > 0.0
      inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
      if dropout:  # the kept probabilities' 1 / (1 - rate), once per row
        inv = inv * keep_scale(st)
      o_smem = smem["q" if dv == d else "o"].at[wg]
      o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
      smem["lse"].at[wg][...] = jnp.where(
          seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_ref.at[rows])
      plgpu.copy_smem_to_gmem(smem["lse"].at[wg],
                              lse_ref.at[batch, head, pl.ds(first, bq)])
      # Also before the next block's Q lands where O is.
      plgpu.wait_smem_to_gmem(0)
      return base + rng.steps

    def produce(batch, head, block, base):
      cta_first = block * (wgs * bq)
      rng = kv_range(st, cta_first, wgs * bq, bkv)
      kv_head = lax.div(head, jnp.int32(st.group))
      bias_batch, bias_head = bias_index(st, batch, head) if has_bias else (0, 0)

      @pl.loop(0, rng.steps)
      def _(t):
        slot = lax.rem(base + t, jnp.int32(stages))
        j = rng.lo + t
        keys = (batch, pl.ds(j * bkv, bkv), kv_head)
        @pl.when(base + t >= stages)
        def _():
          plgpu.barrier_wait(bar["k_consumed"].at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[keys], smem["k"].at[slot], bar["k"].at[slot])
        if st.has_segments:
          plgpu.copy_gmem_to_smem(kvseg_ref.at[batch, pl.ds(j * bkv, bkv)],
                                  smem["kv_ids"].at[slot], bar["extras"].at[slot])
        if has_bias:
          for w in range(wgs):
            tile = (bias_batch, bias_head, pl.ds(cta_first + w * bq, bq),
                    pl.ds(j * bkv, bkv))
            plgpu.copy_gmem_to_smem(bias_ref.at[tile], smem["bias"].at[slot, w],
                                    bar["extras"].at[slot])
        @pl.when(base + t >= stages)
        def _():
          plgpu.barrier_wait(bar["v_consumed"].at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], smem["v"].at[slot], bar["v"].at[slot])
      return base + rng.steps

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      for_each_block(consume)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
      for_each_block(produce)

  tiles = tile_transforms()
  smem = {
      "q": plgpu.SMEM((wgs, bq, d), dtype, transforms=tiles),  # Q, reused for O
      "k": plgpu.SMEM((stages, bkv, d), dtype, transforms=tiles),
      "v": plgpu.SMEM((stages, bkv, dv), dtype, transforms=tiles),
      "lse": plgpu.SMEM((wgs, bq), jnp.float32),
      "q_ids": plgpu.SMEM((wgs, bq), jnp.int32),
      "kv_ids": plgpu.SMEM((stages, bkv), jnp.int32),
  }
  if dv != d:
    smem["o"] = plgpu.SMEM((wgs, bq, dv), dtype, transforms=tiles)
  if has_bias:
    smem["bias"] = plgpu.SMEM((stages, wgs, bq, bkv), bias.dtype)
  bar = {
      # Q (and the q segment ids) per consumer.
      "q": plgpu.Barrier(num_arrivals=1 + st.has_segments, num_barriers=wgs),
      "k": plgpu.Barrier(num_barriers=stages),
      "v": plgpu.Barrier(num_barriers=stages),
      "k_consumed": plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      "v_consumed": plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      "schedule": plgpu.Barrier(num_arrivals=wgs),
  }
  if extras:
    bar["extras"] = plgpu.Barrier(
        num_arrivals=st.has_segments + wgs * has_bias, num_barriers=stages)
  args = [q, k, v] + (list(segments) if st.has_segments else [])
  args += ([bias] if has_bias else []) + ([seed] if dropout else [])
  if persistent:
    grid, grid_names = (persistent,), (CTA_AXIS,)
  else:
    grid, grid_names = (h, n_blocks, b), (HEAD_AXIS, Q_AXIS, BATCH_AXIS)
  return launch(
      kernel, st, name="fusedlm_mosaic_fwd",
      out_type=(jax.ShapeDtypeStruct((b, q_pad, h, dv), dtype),
                jax.ShapeDtypeStruct((b, h, q_pad), jnp.float32)),
      scratch_types=(smem, bar), grid=grid, grid_names=grid_names,
  )(*args)
