"""Self- and cross-attention over the kernel entry point, rotary positions, KV cache.

The layer projects q, k, v, optionally rotates q and k (RoPE), and calls
`kernels.dot_product_attention` with the implementation the config names.
`CrossAttention` (the encoder-decoder's) takes its keys and values from the
encoder output instead, unrotated, and can be handed them precomputed.
Which keys a query sees is described by an `AttentionMask` in the terms of
`kernels.masking` (bottom-right causal, key padding, segment ids).

The config's attention variants go to the kernel entry point too: dropout
on the attention probabilities (training only), a sliding window, the logit
soft-cap, and with position="relative" T5's relative position bias.

Two modes, chosen by whether a cache is passed:
  * no cache (training, encoding, prefill): attend over this call's own keys
    and return them, so the decoder can store a prompt's keys after prefill;
  * with a cache (one decoding step): write this call's keys into the cache at
    each row's fill index, then attend over the whole cache, whose unfilled
    slots the caller hides with the key padding mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from jax import lax

from fusedlm import kernels
from fusedlm.research.models.config import ModelConfig

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


def _heads_projection(cfg: ModelConfig, heads: int, name: str) -> nn.DenseGeneral:
  """[..., hidden] -> [..., heads, head_dim]."""
  return nn.DenseGeneral(
      (heads, cfg.head_dim), dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
      kernel_init=nn.initializers.normal(cfg.init_std), name=name)


def _output_projection(cfg: ModelConfig, std: float) -> nn.DenseGeneral:
  """[..., heads, head_dim] -> [..., hidden]."""
  return nn.DenseGeneral(
      cfg.hidden_size, axis=(-2, -1), dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype, kernel_init=nn.initializers.normal(std),
      name="out")


def relative_position_buckets(
    relative,  # [...] int: key position - query position
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> jax.Array:  # [...] int32 in [0, num_buckets)
  """T5's buckets of relative positions (Raffel et al. 2020, section 2.1).

  Half the buckets (of each direction, if bidirectional) hold one distance
  each; the rest grow logarithmically up to max_distance, past which all
  distances share the last bucket. Unidirectional (a decoder) folds every
  key after the query into bucket 0, as T5 does.
  """
  buckets = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets = jnp.where(relative > 0, num_buckets, 0)
    distance = jnp.abs(relative)
  else:
    distance = jnp.maximum(-relative, 0)
  exact = num_buckets // 2
  far = exact + (
      jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact)
      / jnp.log(max_distance / exact) * (num_buckets - exact)).astype(jnp.int32)
  far = jnp.minimum(far, num_buckets - 1)
  return (buckets + jnp.where(distance < exact, distance, far)).astype(jnp.int32)


class RelativePositionBias(nn.Module):
  """A learned bias per head and relative-position bucket (T5).

  Returns [batch, num_heads, q_len, kv_len] float32 for the kernel's `bias`;
  usable by any attention layer (self- or cross-) that knows both positions.
  """

  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = INIT_STD

  @nn.compact
  def __call__(self, q_positions, kv_positions):  # [batch, q_len], [batch, kv_len]
    table = self.param("embedding", nn.initializers.normal(self.init_std),
                       (self.num_buckets, self.num_heads), self.param_dtype)
    relative = kv_positions[:, None, :] - q_positions[:, :, None]  # [B, T, S]
    buckets = relative_position_buckets(
        relative, self.bidirectional, self.num_buckets, self.max_distance)
    bias = jnp.take(table, buckets, axis=0).astype(jnp.float32)  # [B, T, S, H]
    return jnp.transpose(bias, (0, 3, 1, 2))


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
      deterministic: bool | None = None,
  ):
    """deterministic: no attention dropout. None: dropout exactly when the
    caller gave a "dropout" RNG stream, which research.training.steps' train step does
    (with deterministic=False) and evaluation and decoding do not."""
    cfg = self.cfg
    q = _heads_projection(cfg, cfg.num_heads, "query")(x)  # [B, T, H, D]
    k = _heads_projection(cfg, cfg.kv_heads, "key")(x)  # [B, T, Hkv, D]
    v = _heads_projection(cfg, cfg.kv_heads, "value")(x)
    if cfg.position == "rotary":
      q = apply_rotary(q, positions, cfg.rotary_base)
      k = apply_rotary(k, positions, cfg.rotary_base)
    kv = LayerCache(k, v)
    if cache is not None:
      kv = cache.write(k, v, cache_index)
    # Cache slot j holds position j; without a cache the keys are this call's.
    kv_positions = positions if cache is None else jnp.broadcast_to(
        jnp.arange(kv.keys.shape[1]), (x.shape[0], kv.keys.shape[1]))
    variants = {}
    if cfg.position == "relative":
      variants["bias"] = RelativePositionBias(
          cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance,
          bidirectional=not mask.causal and cache is None,
          param_dtype=cfg.params_dtype, init_std=cfg.init_std, name="relative_bias",
      )(positions, kv_positions)
    if cfg.sliding_window:
      reach = cfg.sliding_window - 1
      if cache is None:
        variants["local_window_size"] = (reach, reach)
      else:
        # Decoding: rows stand at different positions, so the window is a
        # mask of the cache slots from each row's position back.
        variants["mask"] = (kv_positions[:, None, None, :]
                            >= positions[:, None, :, None] - reach)
    variants.update(_score_variants(self, deterministic))
    out = _attend(self, "self-attention", q, kv.keys, kv.values, mask, variants)
    return _output_projection(cfg, self.out_init_std)(out), kv


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """One attention call of a model, as `recording_attention_calls` saw it traced."""

  path: str  # the layer's module path, e.g. "transformer/layer_0/attention"
  kind: str  # "self-attention" | "cross-attention"
  q_len: int
  kv_len: int
  resolution: kernels.Resolution  # the implementation it runs, and why


_RECORDED: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "fusedlm_attention_calls", default=None)


@contextlib.contextmanager
def recording_attention_calls():
  """Collects an `AttentionCall` per attention call traced inside, in call
  order; the calls return zeros of the output's shape instead of running
  (trace under jax.eval_shape: research.models.resolved_attention)."""
  calls: list[AttentionCall] = []
  token = _RECORDED.set(calls)
  try:
    yield calls
  finally:
    _RECORDED.reset(token)


def _attend(module: nn.Module, kind: str, q, k, v, mask: AttentionMask, variants: dict):
  """kernels.dot_product_attention with the config's implementation -> [B, T, H, Dv]."""
  masks = dict(causal=mask.causal, key_padding_mask=mask.key_padding_mask,
               segment_ids=mask.segment_ids, kv_segment_ids=mask.kv_segment_ids)
  calls = _RECORDED.get()
  if calls is not None:
    calls.append(AttentionCall(
        "/".join(module.path), kind, q.shape[1], k.shape[1],
        kernels.explain_implementation(module.cfg.attention, q, k, v, **variants)))
    return jnp.zeros(q.shape[:3] + v.shape[3:], q.dtype)
  return kernels.dot_product_attention(
      q, k, v, **masks, implementation=module.cfg.attention, **variants)


def _score_variants(module: nn.Module, deterministic: bool | None) -> dict:
  """The kernel arguments self- and cross-attention share: the logit soft-cap,
  and attention dropout when not deterministic (None: exactly when the caller
  gave a "dropout" RNG stream)."""
  cfg = module.cfg
  variants = {}
  if cfg.attention_soft_cap:
    variants["logits_soft_cap"] = cfg.attention_soft_cap
  if deterministic is None:
    deterministic = not module.has_rng("dropout")
  if cfg.attention_dropout and not deterministic:
    variants["dropout_rate"] = cfg.attention_dropout
    variants["dropout_rng"] = module.make_rng("dropout")
  return variants


class CrossAttention(nn.Module):
  """Queries from the decoder, keys and values from the encoder output (memory).

  Returns (output [B, T, hidden], LayerCache of the memory's keys and values).
  Decoding computes the memory's keys and values once (the first call, with
  `memory`) and passes them back as `memory_kv` at every later step. No
  rotary positions, relative bias or window: source and target positions are
  not comparable (T5 and the original Transformer put no positional term in
  cross-attention either). Attention dropout and the logit soft-cap apply as
  in self-attention.
  """

  cfg: ModelConfig
  out_init_std: float = INIT_STD

  @nn.compact
  def __call__(
      self,
      x,  # [batch, q_len, hidden]
      mask: AttentionMask,  # key_padding_mask [B, src_len]; segment ids of q and kv
      memory=None,  # [batch, src_len, hidden]: the encoder output
      memory_kv: LayerCache | None = None,  # its keys/values, instead of memory
      deterministic: bool | None = None,  # as SelfAttention's
  ):
    cfg = self.cfg
    q = _heads_projection(cfg, cfg.num_heads, "query")(x)  # [B, T, H, D]
    variants = _score_variants(self, deterministic)
    if memory_kv is None:
      if memory is None:
        raise ValueError("CrossAttention needs the encoder output or its keys/values.")
      memory_kv = LayerCache(
          _heads_projection(cfg, cfg.kv_heads, "key")(memory),  # [B, S, Hkv, D]
          _heads_projection(cfg, cfg.kv_heads, "value")(memory))
    # Not causal: every target position may read the whole source.
    mask = mask.replace(causal=False)
    out = _attend(self, "cross-attention", q, memory_kv.keys, memory_kv.values, mask,
                  variants)  # [B, T, H, D]
    return _output_projection(cfg, self.out_init_std)(out), memory_kv
