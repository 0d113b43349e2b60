"""What the Triton and Mosaic GPU kernels share about tiles on a GPU block.

Powers of two (every tile size is one, so the largest tile of a side is a
multiple of the others and one padded length serves every kernel of a call),
padding an axis up to a whole number of tiles, the shared memory a block can
hold on Hopper, and log2(e) for softmax in exp2.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E): the kernels' softmax runs in exp2
SMEM_BYTES = 227 * 1024  # Largest shared-memory carve-out per block (H100, H200).


def is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def pad_axis(x, axis: int, size: int, value=0):
  """x padded with `value` at the end of `axis` to length `size` (tiles are
  whole: the kernels mask or slice away what this adds)."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)
