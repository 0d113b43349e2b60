"""Tiles and launch settings of the Pallas attention kernels, and what fits a GPU block.

`BlockSizes` is the kernels' one tuning knob; `BlockSizes.get_default` is
the table chosen by compiling for sm_90a (`fusedlm inspect triton`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from fusedlm.kernels.tiling import SMEM_BYTES, is_power_of_two

MIN_BLOCK = 16  # Smallest tile the tensor-core dot takes.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and Triton launch settings of the three kernels.

  block_q / block_k: query rows and key columns per tile of the forward;
  *_dkv: tiles of the dK/dV kernel (block_k_dkv key rows own a program);
  *_dq: tiles of the dQ kernel (block_q_dq query rows own a program).
  num_warps_bwd / num_stages_bwd launch the dK/dV kernel, and the dQ kernel
  too unless num_warps_dq / num_stages_dq are given.
  Blocks are clamped to the (power-of-two-rounded) sequence length, so the
  same BlockSizes serves short and long sequences. On a Hopper GPU a tile
  side of 64 or more rows lets Triton use wgmma (see `get_default`).
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 32
  block_k_dkv: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 32
  num_warps_fwd: int = 4
  num_stages_fwd: int = 3
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2
  num_warps_dq: int | None = None
  num_stages_dq: int | None = None

  def __post_init__(self):
    for field in ("block_q", "block_k", "block_q_dkv", "block_k_dkv",
                  "block_q_dq", "block_k_dq"):
      value = getattr(self, field)
      if not isinstance(value, int) or not is_power_of_two(value):
        raise ValueError(f"BlockSizes.{field} must be a power of two, got {value}.")
      if value < MIN_BLOCK:
        raise ValueError(
            f"BlockSizes.{field} must be at least {MIN_BLOCK} (the smallest"
            f" matrix-unit tile), got {value}."
        )
    for field in ("num_warps_fwd", "num_warps_bwd", "num_warps_dq"):
      value = getattr(self, field)
      if value is None and field == "num_warps_dq":
        continue
      if value not in (1, 2, 4, 8, 16):
        raise ValueError(f"BlockSizes.{field} must be 1, 2, 4, 8 or 16, got {value}.")
    for field in ("num_stages_fwd", "num_stages_bwd", "num_stages_dq"):
      value = getattr(self, field)
      if value is None and field == "num_stages_dq":
        continue
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{field} must be an int >= 1, got {value}.")

  @classmethod
  def get_default(cls, head_dim: int, dtype=None, *, dropout: bool = False,
                  bias: bool = False) -> "BlockSizes":
    """The settings table, by padded head dimension and the costly variants.

    Chosen without a GPU from what the compiler makes of each kernel for
    sm_90a (`fusedlm inspect triton`; BENCHMARKS.md, tuning notes): every
    kernel below compiles without register spills, its K/V loads pipelined
    (cp.async), and its products on wgmma (every tile side that is a
    product's M is >= 64). The dK/dV kernel holds two float32 [block_k_dkv,
    d] accumulators, so it gets 8 warps at every head dim. dtype (default
    bfloat16): float32 tiles take twice the shared memory, so at head dim
    128 the forward keeps 64-key tiles and over 128 one pipeline stage.

    The forward at head dim 128 streams 128-key tiles, the tiles of JAX's
    own Triton op, which ran 10-20% faster than our 64-key tiles in every
    D = 128 cell on an H200 (issue 25), in 16-bit inputs (float32 ones
    keep 64 keys: 128 would need 320 KiB). Two variants change the table:
    `dropout` (its Philox bits take registers: with the plain tiles the
    forward spilled 0.6-5 KiB a thread, at D = 64 the backward too) takes
    32-key forward tiles, and at D = 64 8 warps for the forward and dQ and
    32-row dK/dV query tiles; `bias` keeps 64-key forward tiles at D = 128
    (a float32 bias tile of 128 x 128 per stage took 224 KiB of shared
    memory and all 255 registers).
    """
    padded = padded_head_dim(head_dim)
    wide = dtype is not None and jnp.dtype(dtype).itemsize > 2
    if padded <= 64:
      if dropout:
        return cls(block_q=128, block_k=32, num_warps_fwd=8, num_stages_fwd=3,
                   block_q_dkv=32, block_k_dkv=128, num_warps_bwd=8,
                   num_stages_bwd=2, block_q_dq=128, block_k_dq=32,
                   num_warps_dq=8, num_stages_dq=2)
      return cls(block_q=128, block_k=64, num_warps_fwd=4, num_stages_fwd=3,
                 block_q_dkv=64, block_k_dkv=128, num_warps_bwd=8,
                 num_stages_bwd=2, block_q_dq=128, block_k_dq=32,
                 num_warps_dq=4, num_stages_dq=2)
    if padded <= 128:
      block_k = 32 if dropout else 64 if bias or wide else 128
      return cls(block_q=128, block_k=block_k, num_warps_fwd=8, num_stages_fwd=2,
                 block_q_dkv=32, block_k_dkv=128, num_warps_bwd=8,
                 num_stages_bwd=2, block_q_dq=128, block_k_dq=32,
                 num_warps_dq=8, num_stages_dq=2)
    stages = 1 if wide else 2
    return cls(block_q=64, block_k=32, num_warps_fwd=8, num_stages_fwd=stages,
               block_q_dkv=32, block_k_dkv=64, num_warps_bwd=8,
               num_stages_bwd=stages, block_q_dq=64, block_k_dq=32,
               num_warps_dq=8, num_stages_dq=stages)


def padded_head_dim(head_dim: int) -> int:
  return max(MIN_BLOCK, pl.next_power_of_2(head_dim))


def clamp(block: int, length: int) -> int:
  return min(block, max(MIN_BLOCK, pl.next_power_of_2(length)))


def check_fits(blocks: BlockSizes, head_dim: int, itemsize: int):
  """Rejects tiles whose pipelined buffers overflow a block's shared memory."""
  row = head_dim * itemsize
  needs = {
      "forward (block_q, block_k)":
          blocks.block_q * row + blocks.num_stages_fwd * 2 * blocks.block_k * row,
      "dK/dV (block_q_dkv, block_k_dkv)":
          2 * blocks.block_k_dkv * row
          + blocks.num_stages_bwd * 2 * blocks.block_q_dkv * row,
      "dQ (block_q_dq, block_k_dq)":
          2 * blocks.block_q_dq * row
          + (blocks.num_stages_dq or blocks.num_stages_bwd)
          * 2 * blocks.block_k_dq * row,
  }
  for kernel, nbytes in needs.items():
    if nbytes > SMEM_BYTES:
      raise ValueError(
          f"block sizes do not fit: the {kernel} tiles need {nbytes} bytes of"
          f" shared memory at head_dim {head_dim} (padded), over the"
          f" {SMEM_BYTES} a GPU block can hold; use smaller blocks or fewer"
          " stages."
      )

