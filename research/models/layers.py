"""The pieces all models share: embeddings, the Transformer block and stack, heads.

Parameter names follow the concern, not a source checkpoint
(`research.models.hf_import` maps Hugging Face names onto these):

  embeddings/{token,position,token_type}/embedding, embeddings/norm
  transformer/layer_{i}/{attention/{query,key,value,out},attention_norm,
                          mlp/{up,down},mlp_norm}
  transformer/final_norm                      (pre-LN only)

The encoder-decoder's decoder stack is the same block with `cross_attention`:
a third sublayer, layer_{i}/{cross_attention/{query,key,value,out},
cross_attention_norm}, between self-attention and the MLP.

Normalisation placement (`cfg.norm`):
  pre  (GPT-2):          x += drop(f(LN(x))) per sublayer; a final LN after the
                         stack; no LN on the embeddings.
  post (original BERT):  x = LN(x + drop(f(x))) per sublayer; an LN on the
                         embeddings; no final LN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from fusedlm.research.models.attention import (
  AttentionMask,
  CrossAttention,
  LayerCache,
  SelfAttention,
)
from fusedlm.research.models.config import ModelConfig


def layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  # Statistics are reduced in float32 whatever the compute dtype.
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype, force_float32_reductions=True, name=name)


def dense(cfg: ModelConfig, features: int, name: str, std: float | None = None,
          dtype=None) -> nn.Dense:
  """A Dense layer whose kernel is drawn from N(0, std^2); std None = cfg.init_std."""
  return nn.Dense(
      features, dtype=cfg.compute_dtype if dtype is None else dtype,
      param_dtype=cfg.params_dtype,
      kernel_init=nn.initializers.normal(cfg.init_std if std is None else std),
      name=name)


def residual_init_std(cfg: ModelConfig) -> float:
  """Init scale of the projections that write into the residual stream.

  Pre-LN stacks sum 2 * num_layers sublayer outputs into an unnormalised
  stream, so GPT-2 (section 2.3) scales them by 1/sqrt(2 L); post-LN renormalises
  after each add and BERT keeps init_std.
  """
  if cfg.norm == "pre":
    return cfg.init_std / math.sqrt(2 * cfg.num_layers)
  return cfg.init_std


class Embedding(nn.Module):
  """A lookup table that can also serve as a tied output layer."""

  num_embeddings: int
  features: int
  cfg: ModelConfig

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.initializers.normal(self.cfg.init_std),
        (self.num_embeddings, self.features), self.cfg.params_dtype)

  def __call__(self, ids):  # [...] int -> [..., features] compute dtype
    # Out-of-range ids read NaN (jnp.take's fill mode) rather than a wrong row.
    return jnp.take(self.embedding, ids, axis=0).astype(self.cfg.compute_dtype)

  def attend(self, x):  # [..., features] -> [..., num_embeddings] float32
    """x @ table^T: compute-dtype inputs, float32 accumulation and logits."""
    dtype = self.cfg.compute_dtype
    return jnp.einsum("...h,vh->...v", x.astype(dtype),
                      self.embedding.astype(dtype),
                      preferred_element_type=jnp.float32)


class Embeddings(nn.Module):
  """Token (+ learned position) (+ token type) embeddings, LN (post-LN), dropout."""

  cfg: ModelConfig
  token_types: bool  # the encoder's segment A/B embedding
  # A token table owned by the parent, shared with other Embeddings (the
  # encoder-decoder's source and target); None = a table of its own ("token").
  shared_token: Embedding | None = None

  def setup(self):
    cfg = self.cfg
    if self.shared_token is None:
      self.token = Embedding(cfg.vocab_size, cfg.hidden_size, cfg)
    if cfg.position == "learned":
      self.position = Embedding(cfg.max_len, cfg.hidden_size, cfg)
    if self.token_types:
      self.token_type = Embedding(cfg.type_vocab_size, cfg.hidden_size, cfg)
    if cfg.norm == "post":
      self.norm = layer_norm(cfg, "norm")
    self.dropout = nn.Dropout(cfg.dropout)

  def __call__(
      self,
      input_ids,  # [batch, seq] int
      positions,  # [batch, seq] int
      token_type_ids=None,  # [batch, seq] int; None = all type 0
      deterministic: bool = True,
  ):  # -> [batch, seq, hidden] compute dtype
    x = self._token_table()(input_ids)
    if self.cfg.position == "learned":
      x = x + self.position(positions)
    if self.token_types:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + self.token_type(token_type_ids)
    if self.cfg.norm == "post":
      x = self.norm(x)
    return self.dropout(x, deterministic=deterministic)

  def attend(self, x):  # [..., hidden] -> [..., vocab] float32
    """The output layer tied to the token embedding."""
    return self._token_table().attend(x)

  def output_table(self):  # -> [vocab, hidden], the parameter dtype
    """The tied output layer's matrix (`attend` is x @ output_table()^T)."""
    return self._token_table().embedding

  def _token_table(self) -> Embedding:
    return self.token if self.shared_token is None else self.shared_token


class Mlp(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense(hidden)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):  # [batch, seq, hidden] -> same
    cfg = self.cfg
    h = dense(cfg, cfg.mlp_dim, "up")(x)
    h = nn.gelu(h, approximate=cfg.activation == "gelu_tanh")
    return dense(cfg, cfg.hidden_size, "down", std=residual_init_std(cfg))(h)


class TransformerBlock(nn.Module):
  """Self-attention (, cross-attention) and MLP sublayers with residuals.

  Returns (x, LayerCache); with cross_attention, (x, LayerCache, the memory's
  LayerCache), the latter for decoding to pass back as memory_kv.
  """

  cfg: ModelConfig
  # The encoder-decoder's decoder: attend to the encoder output after
  # self-attention (Vaswani et al. 2017, section 3.1).
  cross_attention: bool = False

  @nn.compact
  def __call__(
      self,
      x,  # [batch, seq, hidden]
      positions,  # [batch, seq] int
      mask: AttentionMask,
      deterministic: bool,  # positional: remat marks it static by index
      cache: LayerCache | None = None,
      cache_index=None,  # [batch] int
      memory=None,  # [batch, src_len, hidden]: encoder output (cross_attention)
      memory_mask: AttentionMask | None = None,  # which source tokens each query sees
      memory_kv: LayerCache | None = None,  # the memory's keys/values, precomputed
  ):
    cfg = self.cfg
    attention = SelfAttention(
        cfg, out_init_std=residual_init_std(cfg), name="attention")
    mlp = Mlp(cfg, name="mlp")
    attention_norm = layer_norm(cfg, "attention_norm")
    mlp_norm = layer_norm(cfg, "mlp_norm")
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    pre = cfg.norm == "pre"
    if pre:
      y, kv = attention(attention_norm(x), positions, mask, cache, cache_index,
                        deterministic=deterministic)
      x = x + drop(y)
    else:
      y, kv = attention(x, positions, mask, cache, cache_index,
                        deterministic=deterministic)
      x = attention_norm(x + drop(y))
    if self.cross_attention:
      cross = CrossAttention(
          cfg, out_init_std=residual_init_std(cfg), name="cross_attention")
      cross_norm = layer_norm(cfg, "cross_attention_norm")
      if memory_mask is None:
        memory_mask = AttentionMask()
      if pre:
        y, memory_kv = cross(cross_norm(x), memory_mask, memory, memory_kv,
                             deterministic=deterministic)
        x = x + drop(y)
      else:
        y, memory_kv = cross(x, memory_mask, memory, memory_kv,
                             deterministic=deterministic)
        x = cross_norm(x + drop(y))
    if pre:
      x = x + drop(mlp(mlp_norm(x)))
    else:
      x = mlp_norm(x + drop(mlp(x)))
    if self.cross_attention:
      return x, kv, memory_kv
    return x, kv


class Transformer(nn.Module):
  """num_layers blocks (rematerialised if cfg.remat) and, pre-LN, the final LN.

  Returns (hidden [batch, seq, hidden], tuple of LayerCache, one per layer);
  with cross_attention also the memory's keys/values, one LayerCache per layer.
  """

  cfg: ModelConfig
  cross_attention: bool = False  # the encoder-decoder's decoder stack

  @nn.compact
  def __call__(
      self,
      x,  # [batch, seq, hidden]
      positions,  # [batch, seq] int
      mask: AttentionMask,
      deterministic: bool = True,
      caches: tuple[LayerCache, ...] | None = None,  # one per layer
      cache_index=None,  # [batch] int
      memory=None,  # [batch, src_len, hidden] (cross_attention)
      memory_mask: AttentionMask | None = None,
      memory_kvs: tuple[LayerCache, ...] | None = None,  # one per layer, precomputed
  ):
    cfg = self.cfg
    block_class = TransformerBlock
    if cfg.remat:
      # Argument 4 (self is 0) is `deterministic`, a Python bool.
      block_class = nn.remat(TransformerBlock, static_argnums=(4,))
    new_caches, new_memory_kvs = [], []
    for i in range(cfg.num_layers):
      cache = None if caches is None else caches[i]
      block = block_class(cfg, self.cross_attention, name=f"layer_{i}")
      if self.cross_attention:
        memory_kv = None if memory_kvs is None else memory_kvs[i]
        x, kv, memory_kv = block(x, positions, mask, deterministic, cache, cache_index,
                                 memory, memory_mask, memory_kv)
        new_memory_kvs.append(memory_kv)
      else:
        x, kv = block(x, positions, mask, deterministic, cache, cache_index)
      new_caches.append(kv)
    if cfg.norm == "pre":
      x = layer_norm(cfg, "final_norm")(x)
    if self.cross_attention:
      return x, tuple(new_caches), tuple(new_memory_kvs)
    return x, tuple(new_caches)


class ClassificationHead(nn.Module):
  """Dropout, then a float32 linear layer: pooled [B, hidden] -> [B, num_labels]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, pooled, deterministic: bool = True):
    cfg = self.cfg
    pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
    return dense(cfg, cfg.num_labels, "dense", dtype=jnp.float32)(
        pooled.astype(jnp.float32))


def default_positions(input_ids) -> jax.Array:  # [batch, seq] int32
  """0, 1, ..., seq-1 on every row."""
  batch, seq = input_ids.shape
  return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
