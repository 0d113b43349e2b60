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

from fusedlm.kernels import masking, variants


@functools.partial(
    jax.jit,
    static_argnames=("causal", "scale", "causal_alignment", "local_window_size",
                     "logits_soft_cap", "dropout_rate", "return_lse"),
)
def reference_attention(
    q,  # [batch, q_len, num_heads, head_dim]
    k,  # [batch, kv_len, num_kv_heads, head_dim]
    v,  # [batch, kv_len, num_kv_heads, v_head_dim]
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask=None,  # [batch, kv_len] bool, True = attend
    segment_ids=None,  # [batch, q_len] int
    kv_segment_ids=None,  # [batch, kv_len] int
    bias=None,  # [batch|1, num_heads|1, q_len|1, kv_len|1] float
    mask=None,  # [batch|1, num_heads|1, q_len|1, kv_len|1] bool, True = attend
    causal_alignment: str = "bottom_right",
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,  # a jax.random key; needed when dropout_rate > 0
    return_lse: bool = False,
):  # out [batch, q_len, num_heads, v_head_dim], q.dtype; with return_lse also
    # lse [batch, num_heads, q_len] float32
  """Softmax attention with the semantics of `kernels.masking` and `kernels.variants`."""
  shape = masking.check_qkv(q, k, v)
  scale = masking.default_scale(shape.head_dim, scale)
  segments = masking.segments_from_masks(
      shape, key_padding_mask, segment_ids, kv_segment_ids
  )
  offset = variants.alignment_offset(shape, causal_alignment)
  window = variants.check_window(local_window_size)
  soft_cap = variants.check_soft_cap(logits_soft_cap)
  dropout_rate = variants.check_dropout(dropout_rate, dropout_rng)
  bias, _ = variants.check_broadcast("bias", bias, shape, boolean=False)
  mask, _ = variants.check_broadcast("mask", mask, shape, boolean=True)
  b, nq, h, d = q.shape
  hkv, g = shape.num_kv_heads, shape.group_size
  nk, dv = shape.kv_len, shape.v_head_dim
  # Grouped heads attend to their shared k/v head without copying it.
  qg = q.reshape(b, nq, hkv, g, d)
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  logits = jnp.einsum(
      "bqhgd,bkhd->bhgqk", qg, k,
      preferred_element_type=jnp.float32, precision=precision,
  ) * scale
  if bias is not None:
    bias = bias.astype(jnp.float32)
    logits = logits + _grouped(bias, hkv, g)
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  visible = masking.dense_mask(shape, causal, segments, offset, window)[:, :, None]
  if mask is not None:
    visible = visible & _grouped(mask, hkv, g)
  logits = jnp.where(visible, logits, -jnp.inf)
  # Rows with no visible key: max is -inf; use 0 so exp gives 0, not NaN.
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  unnormalised = jnp.exp(logits - row_max)
  denominator = jnp.sum(unnormalised, axis=-1, keepdims=True)
  probs = unnormalised / jnp.where(denominator == 0.0, 1.0, denominator)
  if dropout_rate > 0.0:
    seed = variants.seed_words(dropout_rng)
    heads = jnp.arange(h).reshape(1, hkv, g, 1, 1)
    batches = jnp.arange(b).reshape(b, 1, 1, 1, 1)
    probs = probs * variants.dropout_scale(
        seed, batches, heads, jnp.arange(nq)[:, None], jnp.arange(nk)[None, :],
        dropout_rate)
  out = jnp.einsum(
      "bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
      preferred_element_type=jnp.float32, precision=precision,
  )
  out = out.reshape(b, nq, h, dv).astype(q.dtype)
  if not return_lse:
    return out
  empty = denominator == 0.0
  lse = jnp.where(empty, -jnp.inf,
                  row_max + jnp.log(jnp.where(empty, 1.0, denominator)))
  return out, lse[..., 0].reshape(b, h, nq)


def _grouped(x, num_kv_heads: int, group: int):
  """[batch|1, heads|1, q, k] -> [batch|1, kv_heads|1, group|1, q, k]."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], num_kv_heads, group, *x.shape[2:])
