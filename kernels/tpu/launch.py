"""How the TPU kernels are launched: optional inputs, grid steps, compiler settings.

What `kernels.tpu.forward` and `kernels.tpu.backward` share beyond the tile
math of `kernels.tpu.tiles`: the BlockSpecs of the optional inputs (segment
ids, bias, mask, dropout seed) and the order the kernel receives them in,
running a grid step only on visible blocks, Mosaic's compiler parameters,
the interpreter switch and XLA's cost estimate.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fusedlm.kernels.tpu import tiles
from fusedlm.kernels.tpu.block_sizes import ROW_LANES, SUBLANES
from fusedlm.kernels.tpu.tiles import TpuStatic


def interpret_mode(st: TpuStatic):
  """pallas_call's `interpret`: Pallas' TPU interpreter, or compiled."""
  return pltpu.InterpretParams() if st.interpret else False


def compiler_params(st: TpuStatic):
  """Mosaic's settings: the three outer grid axes are independent (megacore
  chips split them over their two cores), the innermost one accumulates."""
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=st.blocks.vmem_limit_bytes)


def cost(b: int, h: int, nq: int, nk: int, d: int, dv: int, itemsize: int,
         st: TpuStatic, matmuls: int) -> pl.CostEstimate:
  """XLA's scheduling estimate: `matmuls` products of [nq, nk] tiles."""
  pairs = b * h * nq * nk * (0.5 if st.causal else 1.0)
  return pl.CostEstimate(
      flops=int(matmuls * pairs * (d + dv)),
      transcendentals=int(pairs),
      bytes_accessed=int(b * h * (nq * (d + dv) + nk * (d + dv)) * itemsize),
  )


def optional_specs(aux, st: TpuStatic, block_q: int, block_k: int, head_of,
                   q_block_of, k_block_of):
  """BlockSpecs and arrays of the segment ids, bias, mask and seed.

  head_of, q_block_of, k_block_of: the grid indices (and prefetched ranges)
  to the query head, query block and key block of a step. A bias or mask
  axis of size 1 is indexed at 0, never materialised.
  """
  specs, arrays = [], []
  if st.has_segments:
    specs.append(pl.BlockSpec(
        (None, block_q, ROW_LANES), lambda *a: (a[0], q_block_of(*a), 0)))
    specs.append(pl.BlockSpec(
        (None, SUBLANES, block_k), lambda *a: (a[0], 0, k_block_of(*a))))
    arrays += [aux.q_ids, aux.kv_ids]
  for array, layout in ((aux.bias, st.var.bias), (aux.mask, st.var.mask)):
    if layout is None:
      continue
    per_batch, per_head = layout
    specs.append(pl.BlockSpec(
        (None, None, block_q, block_k),
        lambda *a, pb=per_batch, ph=per_head: (
            a[0] if pb else 0, head_of(*a) if ph else 0, q_block_of(*a),
            k_block_of(*a))))
    arrays.append(array)
  if st.var.dropout_rate > 0.0:
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    arrays.append(aux.seed)
  return specs, arrays


def unpack(refs, st: TpuStatic):
  """The optional input refs by name, then the rest (outputs, scratch)."""
  refs = list(refs)
  named = {}
  if st.has_segments:
    named["q_ids"], named["kv_ids"] = refs.pop(0), refs.pop(0)
  if st.var.bias is not None:
    named["bias"] = refs.pop(0)
  if st.var.mask is not None:
    named["mask"] = refs.pop(0)
  if st.var.dropout_rate > 0.0:
    named["seed"] = refs.pop(0)
  return named, refs


def run_visible_steps(step, j, first, end, q_start, k_start, block_q, block_k,
                      st: TpuStatic):
  """Runs step(masked) if key block j is in [first, end); masked only where
  the tile straddles a mask edge (`tiles.needs_mask`)."""
  inside = (j >= first) & (j < end)
  masked = tiles.needs_mask(q_start, k_start, block_q, block_k, st)
  if masked is True or masked is False:
    pl.when(inside)(functools.partial(step, masked))
    return
  pl.when(inside & masked)(functools.partial(step, True))
  pl.when(inside & jnp.logical_not(masked))(functools.partial(step, False))


def tile_inputs(named):
  """The step's segment ids ([block_q, 1], [1, block_k]), bias and mask tiles."""
  q_ids = named["q_ids"][...][:, :1] if "q_ids" in named else None
  kv_ids = named["kv_ids"][...][:1, :] if "kv_ids" in named else None
  bias = named["bias"][...] if "bias" in named else None
  mask = named["mask"][...] if "mask" in named else None
  return q_ids, kv_ids, bias, mask
