"""Tiles of the TPU attention kernels: the tuning knob, its floors, and their VMEM.

A TPU core computes on [8, 128] vector registers (sublanes x lanes) and a
128 x 128 systolic matrix unit (MXU), and Mosaic copies whole blocks between
HBM and VMEM. A block's last two dimensions must be multiples of (8, 128) or
the array's full size, so the key side of a score tile ([block_q, block_k]:
keys on the lanes) is a multiple of 128 when compiled, and the query side a
multiple of 32 (int8 mask tiles pack 32 rows a register; 16-bit tiles 16).
The interpreter has no such layout, so tests may use smaller tiles to make
short sequences span several blocks.
"""

from __future__ import annotations

import dataclasses

from jax.experimental import pallas as pl

from fusedlm.kernels.tiling import is_power_of_two

LANES = 128  # vector register width, and the MXU's side
SUBLANES = 8
# Per-row vectors in HBM (the log-sum-exp L, D = rowsum(dO O), query segment
# ids) are stored [rows, ROW_LANES], the value repeated: a block's last dim
# must be 128 or the array's own, and 8 copies instead of 128 make these
# residuals 16x smaller (VMEM still pads the tile to 128 lanes).
ROW_LANES = 8
MIN_BLOCK = 8  # any tile, interpreted
MIN_BLOCK_Q_COMPILED = 32
MIN_BLOCK_K_COMPILED = LANES
# Scoped VMEM a kernel may use unless told otherwise (Mosaic's default on
# v4, v5e and v5p); our tables stay under it, so no kernel raises the limit.
DEFAULT_SCOPED_VMEM = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
  """Tile sizes of the three TPU kernels (powers of two).

  block_q / block_k: query rows and keys per step of the forward; *_dq: of
  the dQ kernel (which also writes d bias); *_dkv: of the dK/dV kernel. Each
  is clamped to the (power-of-two-rounded) sequence length, and not below
  the compiled floors (32 query rows, 128 keys) unless interpreted.
  vmem_limit_bytes: the scoped VMEM each kernel may use (None: Mosaic's
  default, 16 MiB on v4/v5e/v5p); raise it for larger tiles on chips with
  more VMEM (v5e and v6e have 128 MiB).
  """

  block_q: int = 512
  block_k: int = 512
  block_q_dq: int = 256
  block_k_dq: int = 256
  block_q_dkv: int = 256
  block_k_dkv: int = 256
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    limit = self.vmem_limit_bytes
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                              or limit <= 0):
      raise ValueError(
          f"TpuBlockSizes.vmem_limit_bytes must be a positive int or None, got"
          f" {limit!r}.")
    for field in dataclasses.fields(self):
      if field.name == "vmem_limit_bytes":
        continue
      value = getattr(self, field.name)
      if (not isinstance(value, int) or isinstance(value, bool)
          or not is_power_of_two(value) or value < MIN_BLOCK):
        raise ValueError(
            f"TpuBlockSizes.{field.name} must be a power of two of at least"
            f" {MIN_BLOCK}, got {value!r}.")

  @classmethod
  def get_default(cls, head_dim: int) -> "TpuBlockSizes":
    """The table, by the larger head dim (q/k or v).

    Chosen without a TPU from the compiler's VMEM figures for v5e and v4
    (BENCHMARKS.md, TPU section): the largest MXU-aligned tiles whose every
    kernel stays under the 16 MiB default scoped VMEM with room to spare.
    Not yet timed on a TPU.
    """
    if head_dim <= 128:
      return cls()
    return cls(block_q=256, block_k=512, block_q_dq=256, block_k_dq=256,
               block_q_dkv=256, block_k_dkv=256)

  def query_blocks(self) -> tuple[int, ...]:
    return (self.block_q, self.block_q_dq, self.block_q_dkv)

  def key_blocks(self) -> tuple[int, ...]:
    return (self.block_k, self.block_k_dq, self.block_k_dkv)


def clamp(block: int, length: int, floor: int) -> int:
  """The tile for a sequence of `length`: at most the length rounded up to a
  power of two, at least `floor`."""
  return max(floor, min(block, pl.next_power_of_2(length)))


def floors(interpret: bool) -> tuple[int, int]:
  """(query, key) tile floors: the compiled layout's, or the interpreter's."""
  if interpret:
    return MIN_BLOCK, MIN_BLOCK
  return MIN_BLOCK_Q_COMPILED, MIN_BLOCK_K_COMPILED


def vmem_bytes(block_q: int, block_k: int, head_dim: int, v_head_dim: int,
               itemsize: int, kernel: str) -> int:
  """Our estimate of one kernel's VMEM: double-buffered blocks, scratch and
  the float32 [block_q, block_k] temporaries (S, P, dP, dS), without the
  optional segment-id, bias and mask tiles. The compiler's own figure is in
  BENCHMARKS.md; this one guards user block sizes before compiling."""
  q_tile = block_q * head_dim * itemsize
  k_tile = block_k * head_dim * itemsize
  v_tile = block_k * v_head_dim * itemsize
  o_tile = block_q * v_head_dim * itemsize
  stats = block_q * LANES * 4  # a [block_q, ROW_LANES] tile, padded in VMEM
  scores = block_q * block_k * 4
  if kernel == "forward":
    blocks = q_tile + k_tile + v_tile + o_tile + stats
    scratch = 2 * stats + block_q * v_head_dim * 4
    return 2 * blocks + scratch + 2 * scores
  if kernel == "dq":
    blocks = 2 * q_tile + k_tile + v_tile + o_tile + 2 * stats
    return 2 * blocks + block_q * head_dim * 4 + 4 * scores
  if kernel == "dkv":
    blocks = q_tile + 2 * k_tile + 2 * v_tile + o_tile + 2 * stats
    return 2 * blocks + block_k * (head_dim + v_head_dim) * 4 + 4 * scores
  raise ValueError(f"unknown kernel {kernel!r}.")
