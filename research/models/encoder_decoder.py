"""Encoder-decoder Transformer (Vaswani et al. 2017): translation and other seq2seq.

The encoder is the encoder's stack (bidirectional self-attention over the
source); the decoder is the decoder's stack with cross-attention over the
encoder output in every block (`layers.TransformerBlock(cross_attention=True)`).
All three attentions run through `kernels.dot_product_attention` with the
configured implementation. With cfg.share_embeddings (the default) one token
table embeds source and target and is the output layer.

Training / scoring (teacher forcing):
  logits = model.apply(variables, source_ids, target_inputs,
                       source_padding_mask=source_ids != pad)   # [B, T, vocab] f32

target_inputs is the target shifted right behind a start token:
[start, y_1, ..., y_{n-1}] predicts [y_1, ..., y_n]. Packed rows hold several
pairs: pair k's source tokens carry source_segment_ids == k and its target
tokens target_segment_ids == k, positions restart at 0 per pair; a target
token attends only to earlier tokens of its own target and to its own source.

Decoding, with the encoder output's keys and values computed once per layer:
  logits, cache = model.apply(variables, source_ids, source_padding_mask,
                              start_ids, max_len=64, method="start_decoding")
  for _ in range(steps):
    token = jnp.argmax(logits, -1)                                  # [B, 1]
    logits, cache = model.apply(variables, token, cache, method="decode_step")

Parameters:
  token_embedding/embedding                  (share_embeddings)
  source_embeddings/{token,position,norm}    (token without sharing, norm post-LN)
  encoder/layer_{i}/..., encoder/final_norm  (the encoder's block)
  target_embeddings/{token,position,norm}
  decoder/layer_{i}/{attention,attention_norm,cross_attention,
                     cross_attention_norm,mlp,mlp_norm}, decoder/final_norm
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from fusedlm.research.models.attention import AttentionMask, LayerCache
from fusedlm.research.models.config import ModelConfig
from fusedlm.research.models.layers import Embedding, Embeddings, Transformer, default_positions


class Seq2SeqCache(struct.PyTreeNode):
  """What decoding carries from step to step; every leaf is [batch, ...].

  Beam search reorders `layers` and `lengths` along the batch; `memory` and
  `source_mask` are the same for every beam of one source.
  """

  layers: tuple[LayerCache, ...]  # decoder self-attention, [B, max_len, kv_heads, head_dim]
  memory: tuple[LayerCache, ...]  # cross-attention keys/values, [B, src_len, kv_heads, head_dim]
  source_mask: jax.Array  # [batch, src_len] bool, True = a real source token
  lengths: jax.Array  # [batch] int32: target tokens in the cache = next position

  @property
  def max_len(self) -> int:
    return self.layers[0].keys.shape[1]


class EncoderDecoder(nn.Module):
  """Encoder-decoder Transformer; logits are float32."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    if cfg.kind != "encoder_decoder":
      raise ValueError(f"EncoderDecoder needs kind='encoder_decoder', got {cfg.kind!r}.")
    shared = None
    if cfg.share_embeddings:
      self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, cfg)
      shared = self.token_embedding
    self.source_embeddings = Embeddings(cfg, token_types=False, shared_token=shared)
    self.target_embeddings = Embeddings(cfg, token_types=False, shared_token=shared)
    self.encoder = Transformer(cfg)
    self.decoder = Transformer(cfg, cross_attention=True)

  def __call__(
      self,
      source_ids,  # [batch, src_len] int32
      target_inputs,  # [batch, tgt_len] int32: start token + target[:-1]
      *,
      source_padding_mask=None,  # [batch, src_len] bool, True = real; None = all real
      source_positions=None,  # [batch, src_len] int; default 0..src_len-1
      target_positions=None,  # [batch, tgt_len] int; default 0..tgt_len-1
      source_segment_ids=None,  # [batch, src_len] int: pairs of a packed row
      target_segment_ids=None,  # [batch, tgt_len] int: the same pair numbers
      deterministic: bool = True,
  ):  # -> logits [batch, tgt_len, vocab] float32
    memory = self.encode(
        source_ids, source_padding_mask, positions=source_positions,
        segment_ids=source_segment_ids, deterministic=deterministic)
    return self.decode(
        target_inputs, memory, source_padding_mask, positions=target_positions,
        segment_ids=target_segment_ids, source_segment_ids=source_segment_ids,
        deterministic=deterministic)

  def encode(
      self,
      source_ids,  # [batch, src_len] int32
      source_padding_mask=None,  # [batch, src_len] bool
      *,
      positions=None,  # [batch, src_len] int
      segment_ids=None,  # [batch, src_len] int
      deterministic: bool = True,
  ):  # -> memory [batch, src_len, hidden] (after the final LN when pre-LN)
    """The encoder stack over the source (bidirectional within each pair)."""
    if positions is None:
      positions = default_positions(source_ids)
    x = self.source_embeddings(source_ids, positions, deterministic=deterministic)
    mask = AttentionMask(
        causal=False, key_padding_mask=_as_bool(source_padding_mask),
        segment_ids=segment_ids)
    memory, _ = self.encoder(x, positions, mask, deterministic)
    return memory

  def decode(
      self,
      target_inputs,  # [batch, tgt_len] int32
      memory,  # [batch, src_len, hidden]
      source_padding_mask=None,  # [batch, src_len] bool
      *,
      positions=None,  # [batch, tgt_len] int
      segment_ids=None,  # [batch, tgt_len] int
      source_segment_ids=None,  # [batch, src_len] int (with segment_ids)
      deterministic: bool = True,
  ):  # -> logits [batch, tgt_len, vocab] float32
    """The decoder stack: causal over the target, cross-attention over memory."""
    if positions is None:
      positions = default_positions(target_inputs)
    if (segment_ids is None) != (source_segment_ids is None):
      raise ValueError("packed pairs need both target and source segment ids.")
    x = self.target_embeddings(target_inputs, positions, deterministic=deterministic)
    mask = AttentionMask(causal=True, segment_ids=segment_ids)
    memory_mask = AttentionMask(
        key_padding_mask=_as_bool(source_padding_mask), segment_ids=segment_ids,
        kv_segment_ids=source_segment_ids)
    hidden, _, _ = self.decoder(
        x, positions, mask, deterministic, memory=memory, memory_mask=memory_mask)
    return self.target_embeddings.attend(hidden)

  def start_decoding(
      self,
      source_ids,  # [batch, src_len] int32, right-padded
      source_padding_mask,  # [batch, src_len] bool
      start_ids,  # [batch] int32: the token that starts every target
      *,
      max_len: int,  # target positions the cache holds (static)
  ):  # -> (first-token logits [batch, 1, vocab] float32, Seq2SeqCache)
    """Encodes the sources, runs the start token and fills a cache of max_len slots.

    The encoder output's keys and values for every layer's cross-attention
    are computed here, once, and kept in the cache.
    """
    if self.cfg.position == "learned" and max_len > self.cfg.max_len:
      raise ValueError(
          f"max_len ({max_len}) exceeds the learned position table"
          f" (cfg.max_len = {self.cfg.max_len}).")
    source_mask = _as_bool(source_padding_mask)
    memory = self.encode(source_ids, source_mask)
    token = jnp.asarray(start_ids, jnp.int32)[:, None]  # [B, 1]
    positions = jnp.zeros_like(token)
    x = self.target_embeddings(token, positions)
    hidden, kvs, memory_kvs = self.decoder(
        x, positions, AttentionMask(causal=True), True, memory=memory,
        memory_mask=AttentionMask(key_padding_mask=source_mask))
    cache = Seq2SeqCache(
        layers=tuple(kv.padded_to(max_len) for kv in kvs), memory=memory_kvs,
        source_mask=source_mask,
        lengths=jnp.ones((token.shape[0],), jnp.int32))
    return self.target_embeddings.attend(hidden), cache

  def decode_step(
      self,
      token,  # [batch, 1] int32: the target token at position cache.lengths
      cache: Seq2SeqCache,
  ):  # -> (logits [batch, 1, vocab] float32, Seq2SeqCache)
    """Appends one target token per row and predicts the next one.

    A row whose cache is full (lengths == max_len) gets NaN logits instead of
    silently overwriting its last slot.
    """
    slots = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :]
    index = cache.lengths  # [batch]
    positions = index[:, None]
    x = self.target_embeddings(token, positions)
    # q_len = 1: visibility of the cached target is the padding mask alone.
    mask = AttentionMask(causal=False, key_padding_mask=slots <= index[:, None])
    hidden, kvs, _ = self.decoder(
        x, positions, mask, True, cache.layers, index,
        memory_mask=AttentionMask(key_padding_mask=cache.source_mask),
        memory_kvs=cache.memory)
    logits = self.target_embeddings.attend(hidden)
    logits = jnp.where((index < cache.max_len)[:, None, None], logits, jnp.nan)
    return logits, cache.replace(layers=kvs, lengths=index + 1)


def _as_bool(mask):
  return None if mask is None else jnp.asarray(mask).astype(jnp.bool_)
