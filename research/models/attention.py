"""Self-attention over the kernel entry point, with rotary positions and a KV cache.

The layer projects q, k, v, optionally rotates q and k (RoPE), and calls
`kernels.dot_product_attention` with the implementation the config names.
Which keys a query sees is described by an `AttentionMask` in the terms of
`kernels.masking` (bottom-right causal, key padding, segment ids).

Two modes, chosen by whether a cache is passed:
  * no cache (training, encoding, prefill): attend over this call's own keys
    and return them, so the decoder can store a prompt's keys after prefill;
  * with a cache (one decoding step): write this call's keys into the cache at
    each row's fill index, then attend over the whole cache, whose unfilled
    slots the caller hides with the key padding mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from jax import lax

import kernels
from research.models.config import ModelConfig

INIT_STD = 0.02  # BERT and GPT-2 initialise weights from N(0, 0.02^2).


class AttentionMask(struct.PyTreeNode):
  """Which keys each query may see (kernels.masking semantics)."""

  key_padding_mask: jax.Array | None = None  # [batch, kv_len] bool, True = attend
  segment_ids: jax.Array | None = None  # [batch, q_len] int
  kv_segment_ids: jax.Array | None = None  # [batch, kv_len] int
  causal: bool = struct.field(pytree_node=False, default=False)


class LayerCache(struct.PyTreeNode):
  """One layer's keys and values (after RoPE), per batch row and slot."""

  keys: jax.Array  # [batch, slots, num_kv_heads, head_dim]
  values: jax.Array  # [batch, slots, num_kv_heads, head_dim]

  def write(self, keys, values, index) -> "LayerCache":
    """Writes keys/values [B, n, kv_heads, head_dim] to slots index[b]..index[b]+n-1."""
    put = jax.vmap(lambda cache, new, at: lax.dynamic_update_slice_in_dim(
        cache, new.astype(cache.dtype), at, axis=0))
    return LayerCache(put(self.keys, keys, index), put(self.values, values, index))

  def padded_to(self, slots: int) -> "LayerCache":
    """The same keys in a cache of `slots` slots; the new slots are zeros."""
    pad = [(0, 0), (0, slots - self.keys.shape[1]), (0, 0), (0, 0)]
    return LayerCache(jnp.pad(self.keys, pad), jnp.pad(self.values, pad))


def apply_rotary(
    x,  # [batch, seq, heads, head_dim]
    positions,  # [batch, seq] int
    base: float,
) -> jax.Array:  # [batch, seq, heads, head_dim], x.dtype
  """Rotary position embedding (Su et al., RoFormer, eq. 34), half-split layout.

  Feature i is paired with feature i + head_dim/2 (the GPT-NeoX / LLaMA
  layout), so q.k depends on positions only through their difference.
  Angles are computed in float32: bfloat16 positions lose integers past 256.
  """
  half = x.shape[-1] // 2
  inverse_frequency = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] * inverse_frequency
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class SelfAttention(nn.Module):
  """Grouped-query self-attention; returns (output [B, T, hidden], LayerCache)."""

  cfg: ModelConfig
  out_init_std: float = INIT_STD

  @nn.compact
  def __call__(
      self,
      x,  # [batch, q_len, hidden]
      positions,  # [batch, q_len] int; rotates q and k when position="rotary"
      mask: AttentionMask,
      cache: LayerCache | None = None,  # [batch, slots, ...] for decoding
      cache_index=None,  # [batch] int: first slot this call writes
  ):
    cfg = self.cfg
    dtype, param_dtype = cfg.compute_dtype, cfg.params_dtype

    def project(heads, name):
      return nn.DenseGeneral(
          (heads, cfg.head_dim), dtype=dtype, param_dtype=param_dtype,
          kernel_init=nn.initializers.normal(INIT_STD), name=name)(x)

    q = project(cfg.num_heads, "query")  # [B, T, H, D]
    k = project(cfg.kv_heads, "key")  # [B, T, Hkv, D]
    v = project(cfg.kv_heads, "value")
    if cfg.position == "rotary":
      q = apply_rotary(q, positions, cfg.rotary_base)
      k = apply_rotary(k, positions, cfg.rotary_base)
    kv = LayerCache(k, v)
    if cache is not None:
      kv = cache.write(k, v, cache_index)
    out = kernels.dot_product_attention(
        q, kv.keys, kv.values,
        causal=mask.causal,
        key_padding_mask=mask.key_padding_mask,
        segment_ids=mask.segment_ids,
        kv_segment_ids=mask.kv_segment_ids,
        implementation=cfg.attention,
    )  # [B, T, H, D]
    out = nn.DenseGeneral(
        cfg.hidden_size, axis=(-2, -1), dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(self.out_init_std), name="out")(out)
    return out, kv
