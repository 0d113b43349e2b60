"""Plain XLA attention: the kernel's test oracle and the `"xla"` implementation.

It materialises the [q_len, kv_len] scores, so its memory grows with the
square of the sequence length; the fused kernel exists to avoid that. The
matrix products take the inputs' dtype with float32 accumulation, and the
softmax runs in float32. Given float32 inputs it is the float32 oracle the
kernel tests compare against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels import masking


@functools.partial(
    jax.jit,
    static_argnames=("causal", "scale"),
)
def reference_attention(
    q,  # [batch, q_len, num_heads, head_dim]
    k,  # [batch, kv_len, num_kv_heads, head_dim]
    v,  # [batch, kv_len, num_kv_heads, head_dim]
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask=None,  # [batch, kv_len] bool, True = attend
    segment_ids=None,  # [batch, q_len] int
    kv_segment_ids=None,  # [batch, kv_len] int
) -> jax.Array:  # [batch, q_len, num_heads, head_dim], q.dtype
  """Softmax attention with the mask semantics of `kernels.masking`."""
  shape = masking.check_qkv(q, k, v)
  scale = masking.default_scale(shape.head_dim, scale)
  segments = masking.segments_from_masks(
      shape, key_padding_mask, segment_ids, kv_segment_ids
  )
  b, nq, h, d = q.shape
  hkv, g = shape.num_kv_heads, shape.group_size
  # Grouped heads attend to their shared k/v head without copying it.
  qg = q.reshape(b, nq, hkv, g, d)
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  logits = jnp.einsum(
      "bqhgd,bkhd->bhgqk", qg, k,
      preferred_element_type=jnp.float32, precision=precision,
  ) * scale
  mask = masking.dense_mask(shape, causal, segments)[:, :, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  # Rows with no visible key: max is -inf; use 0 so exp gives 0, not NaN.
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  unnormalised = jnp.exp(logits - row_max)
  denominator = jnp.sum(unnormalised, axis=-1, keepdims=True)
  probs = unnormalised / jnp.where(denominator == 0.0, 1.0, denominator)
  out = jnp.einsum(
      "bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
      preferred_element_type=jnp.float32, precision=precision,
  )
  return out.reshape(b, nq, h, d).astype(q.dtype)
