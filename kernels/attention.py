"""The attention entry point: one signature, several implementations.

`dot_product_attention` takes the layout of `jax.nn.dot_product_attention`
and the masks of `kernels.masking`, and dispatches to

  * "pallas": the fused kernel of `kernels.pallas_attention` (compiled through
    Triton on an NVIDIA GPU, run by Pallas' interpreter elsewhere);
  * "xla": the plain reference of `kernels.reference` (materialises scores);
  * "cudnn": cuDNN's fused attention through `jax.nn.dot_product_attention`;
  * "auto": "pallas" on GPU, "xla" on every other backend.

Callers (the models) choose by config; tests hold every implementation to
the same reference.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from kernels import masking
from kernels.pallas_attention import BlockSizes, flash_attention
from kernels.reference import reference_attention

Implementation = Literal["auto", "pallas", "xla", "cudnn"]
IMPLEMENTATIONS = ("auto", "pallas", "xla", "cudnn")


def resolve_implementation(implementation: str) -> str:
  """Maps "auto" to the implementation for the default backend."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"unknown attention implementation {implementation!r}; choose one of"
        f" {', '.join(IMPLEMENTATIONS)}."
    )
  if implementation == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return implementation


def dot_product_attention(
    q,  # [batch, q_len, num_heads, head_dim]
    k,  # [batch, kv_len, num_kv_heads, head_dim]
    v,  # [batch, kv_len, num_kv_heads, head_dim]
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask=None,  # [batch, kv_len] bool, True = attend
    segment_ids=None,  # [batch, q_len] int
    kv_segment_ids=None,  # [batch, kv_len] int; defaults to segment_ids
    implementation: Implementation = "auto",
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim], q.dtype
  """Softmax attention softmax(q k^T * scale) v with optional masks.

  Args:
    q, k, v: queries, keys and values; num_heads must be a multiple of
      num_kv_heads (grouped-query / multi-query attention).
    causal: hide keys after each query, aligned bottom-right (see
      `kernels.masking`).
    scale: multiplier of the scores; default 1/sqrt(head_dim).
    key_padding_mask: False marks padded keys.
    segment_ids, kv_segment_ids: packed sequences; a query sees only keys of
      its own segment. kv_segment_ids is needed only when q_len != kv_len.
    implementation: "auto", "pallas", "xla" or "cudnn".
    block_sizes: tiles of the Pallas kernel (default: its tuned table).
    interpret: run the Pallas kernel in the interpreter; default: on any
      backend but GPU.
  """
  implementation = resolve_implementation(implementation)
  if implementation == "xla":
    return reference_attention(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
    )
  if implementation == "pallas":
    if interpret is None:
      interpret = jax.default_backend() != "gpu"
    return flash_attention(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        block_sizes=block_sizes, interpret=interpret,
    )
  return cudnn_attention(
      q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
  )


def cudnn_attention(
    q, k, v, *, causal=False, scale=None, key_padding_mask=None,
    segment_ids=None, kv_segment_ids=None,
):
  """cuDNN's fused attention, for the arguments it can take.

  Differences from the other implementations, each refused with a
  ValueError rather than answered differently: no segment ids; causal only
  for q_len == kv_len (cuDNN aligns the diagonal top-left); bfloat16 or
  float16 only; head_dim a multiple of 8 up to 256. A key padding mask is
  passed as a mask; a row whose keys are all padded is not zeroed by cuDNN.
  """
  shape = masking.check_qkv(q, k, v)
  if jax.default_backend() != "gpu":
    raise ValueError(
        "implementation='cudnn' needs an NVIDIA GPU; the default backend is"
        f" {jax.default_backend()!r}."
    )
  if segment_ids is not None or kv_segment_ids is not None:
    raise ValueError(
        "implementation='cudnn' does not take segment_ids; use 'pallas' or"
        " 'xla' for packed sequences."
    )
  if causal and shape.q_len != shape.kv_len:
    raise ValueError(
        "implementation='cudnn' aligns the causal mask top-left, which differs"
        f" from ours (bottom-right) when q_len ({shape.q_len}) != kv_len"
        f" ({shape.kv_len}); use 'pallas' or 'xla'."
    )
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"implementation='cudnn' takes bfloat16 or float16, got {q.dtype}."
    )
  if shape.head_dim % 8 or shape.head_dim > 256:
    raise ValueError(
        "implementation='cudnn' needs head_dim a multiple of 8 and at most"
        f" 256, got {shape.head_dim}."
    )
  mask = None
  if key_padding_mask is not None:
    masking.segments_from_masks(shape, key_padding_mask)  # validates
    mask = key_padding_mask[:, None, None, :]
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=masking.default_scale(shape.head_dim, scale),
      is_causal=causal, implementation="cudnn",
  )
