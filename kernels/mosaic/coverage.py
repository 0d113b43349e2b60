"""What implementation="mosaic" takes: the one predicate the entry point and "auto" ask.

`refusal` says, for the static facts of one attention call, why the Hopper
kernel cannot run it, or None when it can. `kernels.attention` refuses an
explicit implementation="mosaic" with that reason, and "auto" on a Hopper
GPU falls back to the Triton kernel with it. The predicate grows with the
kernel: wiring a variant into `kernels.mosaic.attention` means taking it
off `UNWIRED_VARIANTS` here, and "auto" picks the kernel for it from then on.
"""

from __future__ import annotations

from collections.abc import Collection

import jax.numpy as jnp

from fusedlm.kernels.mosaic.tiles import MAX_HEAD_DIM, SPLIT_HEAD_DIM

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # wgmma's 16-bit inputs
# The entry point's variant arguments (kernels.variants.PLAIN) the kernel
# does not take yet: the per-head boolean mask.
UNWIRED_VARIANTS = frozenset({"mask"})


def refusal(*, dtype, head_dim: int, v_head_dim: int,
            variants: Collection[str] = ()) -> str | None:
  """None when the Mosaic kernel takes the call, else why not (one phrase).

  dtype: of q, k and v; head_dim / v_head_dim: of q and k, and of v;
  variants: the names of the variant arguments the call sets to other than
  plain attention's (`kernels.variants.given`).
  """
  unwired = [name for name in variants if name in UNWIRED_VARIANTS]
  if unwired:
    return f"mosaic does not take {', '.join(unwired)}"
  if jnp.dtype(dtype) not in DTYPES:
    return (f"mosaic takes bfloat16 or float16 (wgmma's 16-bit inputs), not"
            f" {jnp.dtype(dtype).name}")
  widest = max(head_dim, v_head_dim)
  if widest > MAX_HEAD_DIM:
    return f"mosaic takes head dims up to {MAX_HEAD_DIM}, not {widest}"
  if "bias" in variants and widest > SPLIT_HEAD_DIM:
    # Past 128 the Q, K and V tiles leave no shared memory for the bias ring
    # even at 64-row tiles (`MosaicBlockSizes.smem_bytes`; BENCHMARKS.md,
    # "Bias past head dim 128"), and 32-row tiles do not lower.
    return (f"mosaic takes a bias at head dims up to {SPLIT_HEAD_DIM}, not"
            f" {widest} (shared memory)")
  return None
