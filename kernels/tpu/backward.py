"""The TPU attention backward: a dQ kernel (which also writes d bias) and a dK/dV kernel.

FlashAttention-2's Algorithm 2, split in two passes so that neither needs
atomic adds: both recompute P = exp(S - L) tile by tile from the forward's
log-sum-exp L, and dS = P (dP - D) with D = rowsum(dO O) (section 3.1.2;
computed in XLA, an O(N d) pass).

  * dQ: grid (batch, heads, query blocks, key blocks), the key axis
    sequential; dQ += dS K accumulates in float32 VMEM. With a bias, the
    same step writes its dS tile (d bias), zeros on skipped tiles.
  * dK/dV: grid (batch, kv heads, key blocks, group x query blocks): the
    innermost axis walks every query block of every query head that shares
    this K/V head, so grouped-query heads are summed in the float32 VMEM
    accumulators (dV += P^T dO, dK += dS^T Q) and K/V are never repeated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fusedlm.kernels.tpu import tiles
from fusedlm.kernels.tpu.block_sizes import ROW_LANES
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


def _ds(q, k, v, do, lse, delta, q_start, k_start, named, keep, masked: bool,
        st: TpuStatic):
  """(P, dS) of one [block_q, block_k] tile; lse and delta are [block_q, 1].

  P here is before dropout; dS is d loss / d (scaled, biased) logits.
  """
  shape = (q.shape[0], k.shape[0])
  q_ids, kv_ids, bias, mask = tile_inputs(named)
  s, cap_grad = tiles.logits(tiles.dot(q, k, 1, 1), bias, st)
  if masked:
    s = jnp.where(tiles.visible(q_start, k_start, shape, q_ids, kv_ids, mask, st),
                  s, -jnp.inf)
  # L = +inf on a row that sees no key, so P = 0 there.
  p = jnp.exp(s - lse)
  dp = tiles.dot(do, v, 1, 1)
  if keep is not None:
    dp = dp * keep
  ds = p * (dp - delta)
  return p, (ds if cap_grad is None else ds * cap_grad)


def backward_dq(q, k, v, do, lse, delta, aux, st: TpuStatic):
  """dQ [b, h, q_pad, d] (q.dtype) and, with a bias, dS [b, h, q_pad, kv_pad]
  float32 (else None). lse, delta: [b, h, q_pad, ROW_LANES] float32."""
  b, h, q_pad, d = q.shape
  kv_pad, dv = k.shape[2], v.shape[3]
  block_q, block_k = st.tiles[1]
  nq, nk = q_pad // block_q, kv_pad // block_k
  group = st.group

  def k_block_of(bi, hi, i, j, ranges):
    first, end = tiles.block_range(ranges, bi, i, nq, st)
    return tiles.clamp_index(j, first, end)

  rows = lambda width: pl.BlockSpec((None, None, block_q, width),
                                    lambda bi, hi, i, j, r: (bi, hi, i, 0))
  keys = lambda width: pl.BlockSpec(
      (None, None, block_k, width),
      lambda bi, hi, i, j, r: (bi, tiles.div(hi, group), k_block_of(bi, hi, i, j, r), 0))
  in_specs = [rows(d), keys(d), keys(dv), rows(dv), rows(ROW_LANES), rows(ROW_LANES)]
  specs, arrays = optional_specs(aux, st, block_q, block_k,
                                 lambda bi, hi, i, j, r: hi,
                                 lambda bi, hi, i, j, r: i, k_block_of)
  with_bias = st.var.bias is not None

  def kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    named, rest = unpack(refs, st)
    dq_ref, ds_ref, acc_ref = rest if with_bias else (rest[0], None, rest[1])
    bi, hi, i, j = (pl.program_id(a) for a in range(4))
    first, end = tiles.block_range(ranges_ref, bi, i, nq, st)
    q_start, k_start = i * block_q, j * block_k

    @pl.when(j == 0)
    def _init():
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked: bool):
      keep = tiles.dropout_tile(named.get("seed"), bi, hi, q_start, k_start,
                                (block_q, block_k), st)
      k = k_ref[...]
      _, ds = _ds(q_ref[...], k, v_ref[...], do_ref[...],
                  tiles.column(lse_ref[...]), tiles.column(delta_ref[...]),
                  q_start, k_start, named, keep, masked, st)
      acc_ref[...] += tiles.dot(ds.astype(k.dtype), k, 1, 0)
      if with_bias:
        ds_ref[...] = ds

    run_visible_steps(step, j, first, end, q_start, k_start, block_q, block_k, st)
    if with_bias:
      @pl.when((j < first) | (j >= end))
      def _skipped():
        ds_ref[...] = jnp.zeros(ds_ref.shape, jnp.float32)

    @pl.when(j == nk - 1)
    def _finish():
      # dS is in units of the scaled logits: dQ = scale dS K.
      dq_ref[...] = (acc_ref[...] * st.scale).astype(dq_ref.dtype)

  out_specs = [rows(d)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if with_bias:
    out_specs.append(pl.BlockSpec((None, None, block_q, block_k),
                                  lambda bi, hi, i, j, r: (bi, hi, i, j)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, q_pad, kv_pad), jnp.float32))
  result = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, nk),
          in_specs=in_specs + specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=compiler_params(st),
      cost_estimate=cost(b, h, q_pad, kv_pad, d, dv, q.dtype.itemsize, st, 3),
      interpret=interpret_mode(st),
      name="fusedlm_tpu_bwd_dq",
  )(aux.kv_ranges_dq, q, k, v, do, lse, delta, *arrays)
  return (result[0], result[1]) if with_bias else (result[0], None)


def backward_dkv(q, k, v, do, lse, delta, aux, st: TpuStatic):
  """dK [b, hkv, kv_pad, d] and dV [b, hkv, kv_pad, dv] in k's dtype."""
  b, h, q_pad, d = q.shape
  hkv, kv_pad, dv = k.shape[1], k.shape[2], v.shape[3]
  block_q, block_k = st.tiles[2]
  nq, nk = q_pad // block_q, kv_pad // block_k
  group = st.group

  # Grid (b, kv head, key block j, t): t walks the group's query heads
  # (tiles.div(t, nq)) and each one's query blocks (tiles.rem(t, nq)).
  def head_of(bi, hk, j, t, ranges):
    return hk * group + tiles.div(t, nq)

  def q_block_of(bi, hk, j, t, ranges):
    first, end = tiles.block_range(ranges, bi, j, nk, st)
    return tiles.clamp_index(tiles.rem(t, nq), first, end)

  rows = lambda width: pl.BlockSpec(
      (None, None, block_q, width),
      lambda *a: (a[0], head_of(*a), q_block_of(*a), 0))
  keys = lambda width: pl.BlockSpec((None, None, block_k, width),
                                    lambda bi, hk, j, t, r: (bi, hk, j, 0))
  in_specs = [rows(d), keys(d), keys(dv), rows(dv), rows(ROW_LANES), rows(ROW_LANES)]
  specs, arrays = optional_specs(aux, st, block_q, block_k, head_of, q_block_of,
                                 lambda bi, hk, j, t, r: j)

  def kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    named, (dk_ref, dv_ref, dk_acc, dv_acc) = unpack(refs, st)
    bi, hk, j, t = (pl.program_id(a) for a in range(4))
    first, end = tiles.block_range(ranges_ref, bi, j, nk, st)
    i = tiles.rem(t, nq)
    head = hk * group + tiles.div(t, nq)
    q_start, k_start = i * block_q, j * block_k

    @pl.when(t == 0)
    def _init():
      dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
      dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked: bool):
      keep = tiles.dropout_tile(named.get("seed"), bi, head, q_start, k_start,
                                (block_q, block_k), st)
      q, do = q_ref[...], do_ref[...]
      p, ds = _ds(q, k_ref[...], v_ref[...], do, tiles.column(lse_ref[...]),
                  tiles.column(delta_ref[...]), q_start, k_start, named, keep,
                  masked, st)
      if keep is not None:
        p = p * keep
      # The transposed products (P^T dO, dS^T Q) contract the query axis.
      dv_acc[...] += tiles.dot(p.astype(do.dtype), do, 0, 0)
      dk_acc[...] += tiles.dot(ds.astype(q.dtype), q, 0, 0)

    run_visible_steps(step, i, first, end, q_start, k_start, block_q, block_k, st)

    @pl.when(t == group * nq - 1)
    def _finish():
      dk_ref[...] = (dk_acc[...] * st.scale).astype(dk_ref.dtype)
      dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, hkv, nk, group * nq),
          in_specs=in_specs + specs,
          out_specs=[keys(d), keys(dv)],
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                          pltpu.VMEM((block_k, dv), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=compiler_params(st),
      cost_estimate=cost(b, h, q_pad, kv_pad, d, dv, q.dtype.itemsize, st, 4),
      interpret=interpret_mode(st),
      name="fusedlm_tpu_bwd_dkv",
  )(aux.q_ranges_dkv, q, k, v, do, lse, delta, *arrays)
