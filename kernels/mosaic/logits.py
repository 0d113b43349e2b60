"""One score tile of the Mosaic GPU kernels from raw products to logits: variants and masks.

The semantics are `kernels.variants`'s, evaluated on a [rows, cols] float32
tile in the WGMMA layout of one consumer warpgroup, whose queries run along
`q_axis` (0; 1 in the dK/dV kernel's transposed tiles) and keys along the
other. Each step is a trace-time specialisation: a plain call traces to the
kernel it had before variants existed (one multiply per score, the row
maximum taken on the raw products).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, vector
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from fusedlm.kernels import variants
from fusedlm.kernels.mosaic.bounds import left_reach, right_reach
from fusedlm.kernels.mosaic.tiles import MosaicStatic, positions
from fusedlm.kernels.tiling import LOG2E

def logits(st: MosaicStatic, s, bias=None):
  """(x, factor, cap_grad) of raw products s (= q.k) and the bias tile.

  x * factor is the tile's logits in log2 units: the plain kernel keeps x = s
  and factor = scale * log2(e), so that the row maximum is taken before the
  one multiply; with a bias or a soft-cap x is already in log2 units and
  factor is 1. cap_grad: d capped / d uncapped logit (1 - tanh^2), or None.
  """
  if st.var.bias is None and st.var.soft_cap is None:
    return s, st.score_scale, None
  x = s * st.scale
  if bias is not None:
    x = x + bias.astype(jnp.float32)
  cap_grad = None
  if st.var.soft_cap is not None:
    t = jnp.tanh(x * (1.0 / st.var.soft_cap))
    x = st.var.soft_cap * t
    cap_grad = 1.0 - t * t
  return x * LOG2E, 1.0, cap_grad


def scaled(x, factor):
  return x if factor == 1.0 else x * factor


def hide(st: MosaicStatic, s, q_first, kv_first, q_ids=None, kv_ids=None, *,
         q_axis: int, tail: bool):
  """The tile s with the pairs that may not attend at -inf.

  q_first / kv_first: the tile's first query and key. q_ids / kv_ids: its
  segment id vectors (WGMMA.reduce(1 - axis) layouts), or None. Causal
  masking and the window follow st; tail: also hide padded keys. Positions
  are built only for the masks that need them: an unused iota has no layout
  for Mosaic's layout inference to find.
  """
  shape, kv_axis = s.shape, 1 - q_axis
  visible = None

  def both(mask):
    return mask if visible is None else visible & mask

  right, left = right_reach(st), left_reach(st)
  if right is not None or left is not None or tail:
    keys = positions(kv_first, shape, kv_axis)
    if right is not None or left is not None:
      # Diagonal position of each query row.
      diagonal = positions(q_first + st.offset, shape, q_axis)
    if right is not None:
      visible = both(keys <= diagonal + right)
    if left is not None:
      visible = both(keys >= diagonal - left)
    if tail:
      visible = both(keys < st.kv_len)
  if q_ids is not None:
    visible = both(lax.broadcast_in_dim(q_ids, shape, [q_axis])
                   == lax.broadcast_in_dim(kv_ids, shape, [kv_axis]))
  return jnp.where(visible, s, -jnp.inf)


def keep_scale(st: MosaicStatic) -> float:
  """What a kept probability is multiplied by: 1 / (1 - rate)."""
  return 1.0 / (1.0 - st.var.dropout_rate)


def dropout_mask(st: MosaicStatic, seed_ref, batch, head, q_first, kv_first,
                 shape, *, q_axis: int):
  """The pairs of a [rows, cols] tile that dropout keeps, for `dropped`.

  The bits are `kernels.variants.dropout_keep`'s: Philox of (seed, batch,
  head, query row, key column), so the kernel's backward and the reference
  draw the same ones. seed_ref: the two key words ([2] uint32 in global
  memory), read here rather than held in registers across the loop.

  Compiled, the mask is drawn while a wgmma runs (the caller issues it
  between the product and the read of its accumulator, so the integer work
  overlaps the tensor cores) and held as packed bits, one 32-bit word per
  32 pairs a thread, until `dropped` applies it. The interpreter, which
  cannot run Mosaic GPU's own IR, draws a bool tile with variants' jnp code.
  """
  seed = (seed_ref[0], seed_ref[1])
  q_pos = positions(q_first, shape, q_axis)
  kv_pos = positions(kv_first, shape, 1 - q_axis)
  if st.interpret:
    return variants.dropout_keep(seed, batch, head, q_pos, kv_pos,
                                 st.var.dropout_rate)
  counter = variants.dropout_counter(batch, head, q_pos, kv_pos)
  key = tuple(jnp.zeros(shape, jnp.uint32) + word.astype(jnp.uint32)
              for word in seed)
  return _packed_keep(counter, key, variants.dropout_threshold(st.var.dropout_rate),
                      column_word=0 if q_axis == 0 else 1)


def dropped(st: MosaicStatic, x, mask):
  """x with the pairs `mask` (from `dropout_mask`, same shape) drops at 0;
  the kept ones are not rescaled (the caller multiplies by `keep_scale`
  where it is cheapest: once per output row, or in a float32 product it
  makes anyway)."""
  if st.interpret:
    return jnp.where(mask, x, jnp.zeros_like(x))
  return _apply_packed(x, mask)


class _RegisterWords:
  """`variants.PhiloxWords` for Mosaic GPU register arrays (FragmentedArray),
  with the hardware's high multiply (`mul.hi.u32`)."""

  @staticmethod
  def mulhilo(a, m: int):
    def high(register):
      ty = register.type
      element = ty.element_type if isinstance(ty, ir.VectorType) else ty
      constant = ir.IntegerAttr.get(element, m)
      if isinstance(ty, ir.VectorType):
        constant = ir.DenseElementsAttr.get_splat(ty, constant)
      return arith.MulUIExtendedOp(register, arith.constant(ty, constant)).high
    return a._pointwise(high), a * m

  @staticmethod
  def add(a, w: int):
    return a + w


# Tiles of 8 columns whose bits share one 32-bit word: a thread holds 4
# values of each (2 rows x 2 columns of the WGMMA layout).
TILES_PER_WORD = 8


def _packed_layout(shape):
  """Packed bits of a WGMMA-layout tile: one 32-bit word a thread per 64
  columns (or fewer)."""
  words = pl.cdiv(shape[1], 8 * TILES_PER_WORD)
  layout = plgpu.Layout.WG_STRIDED((128 * words,), vec_size=1)
  return layout, plgpu.ShapeDtypeStruct((128 * words,), jnp.uint32, layout=layout)


def _bit_positions(registers: np.ndarray):
  """(register index, element, word, bit) of each value a thread holds, in
  the order `_packed_keep` packs them: tile c of 8 columns owns bits 4 (c %
  8) .. 4 (c % 8) + 3 of word c // 8."""
  tiles, pair = registers.shape[1], registers.size // registers.shape[1]
  if pair != 2:
    raise NotImplementedError(f"a WGMMA-layout register array {registers.shape}")
  for index in np.ndindex(registers.shape):
    c, r = index[1], int(np.ravel_multi_index(
        index[:1] + index[2:], registers.shape[:1] + registers.shape[2:]))
    for element in range(2):  # a register holds 2 adjacent columns
      yield index, element, c // TILES_PER_WORD, 4 * (c % TILES_PER_WORD) + 2 * r + element


def _packed_keep(counter, key, threshold: int, column_word: int):
  """Whether word 0 of Philox-4x32 of each pair is >= threshold, packed.

  counter, key: `variants.dropout_counter`'s words and the key, uint32 tiles
  in the WGMMA layout; column_word: the counter word that walks the tile's
  columns (0, the key position; 1, the query position in a transposed tile).
  The rounds are `variants.philox4x32`'s in one `inline_mgpu` op, as a loop
  over the tile's 8-column slices: Pallas array ops on a whole [64, 128]
  tile keep 4 words x 64 pairs a thread live and spilled, and unrolled over
  slices they took Mosaic's layout inference minutes (it scales with the op
  count) and still spilled beside the accumulators. The loop holds one
  slice's words (4 pairs a thread) and the packed bits.
  """
  wgmma = plgpu.Layout.WGMMA
  _, out = _packed_layout(counter[0].shape)
  words = out.shape[0] // 128

  @plgpu.inline_mgpu(arg_types=(wgmma,) * 6, return_type=out)
  def pack(_, *inputs):
    i32 = ir.IntegerType.get_signless(32)
    first = [mgpu.FragmentedArray(_registers=w.registers[:, :1], _layout=w.layout,
                                  _is_signed=False) for w in inputs]
    slice_bits = list(_bit_positions(first[0].registers))
    packed = []
    for word in range(words):
      def body(i, bits_so_far, word=word):
        tile = arith.addi(arith.index_cast(i32, i), mgpu.c(word * TILES_PER_WORD, i32))
        shift = arith.muli(arith.index_cast(i32, i), mgpu.c(4, i32))
        part = list(first)
        part[column_word] = part[column_word] + arith.muli(tile, mgpu.c(8, i32))
        bits = variants.philox4x32(part[:4], part[4:], words=_RegisterWords)[0]
        kept = (bits >= threshold).registers
        for index, element, _, bit in slice_bits:
          one = arith.extui(i32, vector.extract(
              kept[index], dynamic_position=[], static_position=[element]))
          bits_so_far = arith.ori(bits_so_far, arith.shli(
              one, arith.addi(shift, mgpu.c(bit, i32))))
        return bits_so_far
      count = min(TILES_PER_WORD, inputs[0].registers.shape[1])
      packed.append(mgpu.fori(mgpu.c(count, ir.IndexType.get()),
                              mgpu.c(0, i32))(body).results[0])
    vec = ir.VectorType.get((1,), i32)
    return mgpu.FragmentedArray(
        _registers=np.array([vector.broadcast(vec, w) for w in packed]),
        _layout=mgpu.WGStridedFragLayout((out.shape[0],), vec_size=1),
        _is_signed=False)
  # A word broadcast over the tile (head, batch, the key) has no layout of
  # its own that inline_mgpu can take: give it the one declared.
  return pack(*(plgpu.layout_cast(w, wgmma) for w in (*counter, *key)))


def _apply_packed(x, mask):
  """x (WGMMA layout) with the pairs whose packed bit is 0 at 0."""
  wgmma = plgpu.Layout.WGMMA
  layout, _ = _packed_layout(x.shape)
  out = plgpu.ShapeDtypeStruct(x.shape, x.dtype, layout=wgmma)

  @plgpu.inline_mgpu(arg_types=(wgmma, layout), return_type=out)
  def apply(_, values, packed):
    i32 = ir.IntegerType.get_signless(32)
    words = [vector.extract(r, dynamic_position=[], static_position=[0])
             for r in packed.registers.flat]
    bit_vectors = np.empty(values.registers.shape, dtype=object)
    for index, element, word, bit in _bit_positions(values.registers):
      on = arith.cmpi(arith.CmpIPredicate.ne, mgpu.c(0, i32), arith.andi(
          words[word], mgpu.c(1 << bit if bit < 31 else -(1 << 31), i32)))
      previous = (bit_vectors[index] if element else
                  vector.broadcast(ir.VectorType.get((2,), on.type), on))
      bit_vectors[index] = vector.insert(on, previous, dynamic_position=[],
                                         static_position=[element])
    registers = np.empty_like(values.registers)
    for index in np.ndindex(registers.shape):
      zero = arith.constant(values.registers[index].type, ir.DenseElementsAttr.get_splat(
          values.registers[index].type, ir.FloatAttr.get(values.mlir_dtype, 0.0)))
      registers[index] = arith.select(bit_vectors[index], values.registers[index], zero)
    return mgpu.FragmentedArray(_registers=registers, _layout=values.layout,
                                _is_signed=None)
  return apply(plgpu.layout_cast(x, wgmma), mask)
