"""The TPU attention forward: online softmax over streamed key blocks.

FlashAttention-2's Algorithm 1 on a Pallas TPU grid (batch, heads, query
blocks, key blocks): the key axis is innermost and sequential ("arbitrary"),
so the running row maximum m, row sum l and output accumulator stay in
float32 VMEM scratch across it; the other three axes are independent
("parallel": megacore chips split them over their two cores). Block
skipping and masks: `kernels.tpu.tiles`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fusedlm.kernels.tpu import tiles
from fusedlm.kernels.tpu.block_sizes import LANES, ROW_LANES
from fusedlm.kernels.tpu.launch import (
  compiler_params,
  cost,
  interpret_mode,
  optional_specs,
  run_visible_steps,
  tile_inputs,
  unpack,
)
from fusedlm.kernels.tpu.tiles import TpuStatic


def forward(q, k, v, aux, st: TpuStatic):
  """out [b, h, q_pad, dv] (q.dtype) and L [b, h, q_pad, ROW_LANES] float32
  (natural log, lane-broadcast, +inf on a row that sees no key) from the
  padded, head-major inputs q [b, h, q_pad, d], k, v [b, hkv, kv_pad, d|dv]."""
  b, h, q_pad, d = q.shape
  kv_pad, dv = k.shape[2], v.shape[3]
  block_q, block_k = st.tiles[0]
  nq, nk = q_pad // block_q, kv_pad // block_k
  group = st.group

  def k_block_of(bi, hi, i, j, ranges):
    first, end = tiles.block_range(ranges, bi, i, nq, st)
    return tiles.clamp_index(j, first, end)

  head_of = lambda bi, hi, i, j, ranges: hi
  q_block_of = lambda bi, hi, i, j, ranges: i
  in_specs = [
      pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j, r: (bi, hi, i, 0)),
      pl.BlockSpec((None, None, block_k, d),
                   lambda bi, hi, i, j, r: (bi, tiles.div(hi, group),
                                            k_block_of(bi, hi, i, j, r), 0)),
      pl.BlockSpec((None, None, block_k, dv),
                   lambda bi, hi, i, j, r: (bi, tiles.div(hi, group),
                                            k_block_of(bi, hi, i, j, r), 0)),
  ]
  specs, arrays = optional_specs(aux, st, block_q, block_k, head_of,
                                 q_block_of, k_block_of)

  def kernel(ranges_ref, q_ref, k_ref, v_ref, *refs):
    named, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = unpack(refs, st)
    bi, hi, i, j = (pl.program_id(a) for a in range(4))
    first, end = tiles.block_range(ranges_ref, bi, i, nq, st)
    q_start, k_start = i * block_q, j * block_k

    @pl.when(j == 0)
    def _init():
      m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
      l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked: bool):
      shape = (block_q, block_k)
      q_ids, kv_ids, bias, mask = tile_inputs(named)
      s, _ = tiles.logits(tiles.dot(q_ref[...], k_ref[...], 1, 1), bias, st)
      if masked:
        s = jnp.where(tiles.visible(q_start, k_start, shape, q_ids, kv_ids,
                                    mask, st), s, -jnp.inf)
      m_prev = tiles.column(m_ref[...])
      l_prev = tiles.column(l_ref[...])
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      # A row that has seen only hidden keys keeps m = -inf; shift it by 0
      # instead, so that exp gives 0, not NaN.
      m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
      p = jnp.exp(s - m_shift)
      correction = jnp.exp(m_prev - m_shift)
      l_next = correction * l_prev + jnp.sum(p, axis=1, keepdims=True)
      keep = tiles.dropout_tile(named.get("seed"), bi, hi, q_start, k_start,
                                shape, st)
      if keep is not None:  # after the row sum: the softmax is of the whole row
        p = p * keep
      v = v_ref[...]
      acc_ref[...] = acc_ref[...] * correction + tiles.dot(p.astype(v.dtype), v, 1, 0)
      m_ref[...] = tiles.lanes(m_next, LANES)
      l_ref[...] = tiles.lanes(l_next, LANES)

    run_visible_steps(step, j, first, end, q_start, k_start, block_q, block_k, st)

    @pl.when(j == nk - 1)
    def _finish():
      # FlashAttention-2, Algorithm 1, line 12; rows that saw no key -> 0.
      l = tiles.column(l_ref[...])
      empty = l == 0.0
      safe = jnp.where(empty, 1.0, l)
      o_ref[...] = (acc_ref[...] / safe).astype(o_ref.dtype)
      lse = jnp.where(empty, jnp.inf, tiles.column(m_ref[...]) + jnp.log(safe))
      lse_ref[...] = tiles.lanes(lse, ROW_LANES)

  row_spec = lambda width: pl.BlockSpec(
      (None, None, block_q, width), lambda bi, hi, i, j, r: (bi, hi, i, 0))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, nk),
          in_specs=in_specs + specs,
          out_specs=[row_spec(dv), row_spec(ROW_LANES)],
          scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                          pltpu.VMEM((block_q, LANES), jnp.float32),
                          pltpu.VMEM((block_q, dv), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((b, h, q_pad, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, q_pad, ROW_LANES), jnp.float32)],
      compiler_params=compiler_params(st),
      cost_estimate=cost(b, h, q_pad, kv_pad, d, dv, q.dtype.itemsize, st, 2),
      interpret=interpret_mode(st),
      name="fusedlm_tpu_fwd",
  )(aux.kv_ranges_fwd, q, k, v, *arrays)
