"""GPT-style decoder: causal self-attention, tied LM head, packing, KV-cache decoding.

Training / scoring:
  logits = model.apply(variables, input_ids, positions=..., segment_ids=...)

Packed sequences: documents in one row carry distinct `segment_ids` and
positions that restart at 0 per document; attention never crosses segments.

Generation with an explicit, fixed-size cache pytree (`DecodeCache`):
  logits, cache = model.apply(variables, prompts, lengths, max_len=64,
                              method=Decoder.prefill)
  for _ in range(steps):
    token = jnp.argmax(logits, -1)                         # [B, 1]
    logits, cache = model.apply(variables, token, cache,
                                method=Decoder.decode_step)

Prompts are RIGHT-padded: row b holds its prompt in input_ids[b, :lengths[b]].
Prefill runs the whole prompt through the kernel (causal, q_len = kv_len) and
stores its keys in slots [0, P) of a cache of `max_len` slots; each decoding
step writes one token at slot lengths[b] of its row and attends over the cache
with the key padding mask `slot <= lengths[b]` (the unfilled slots, and the
prompt padding past lengths[b], are hidden). Positions equal slot indices, so
each row's positions are 0, 1, 2, ... as in training. `max_len` is a static
Python int (mark it static under jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from fusedlm.research.models.attention import AttentionMask, LayerCache
from fusedlm.research.models.config import ModelConfig
from fusedlm.research.models.layers import (
  ClassificationHead,
  Embeddings,
  Transformer,
  default_positions,
)


class DecodeCache(struct.PyTreeNode):
  """Keys and values of every layer plus how many slots of each row are filled."""

  layers: tuple[LayerCache, ...]  # each [batch, max_len, num_kv_heads, head_dim]
  lengths: jax.Array  # [batch] int32: filled slots = the next token's position

  @property
  def max_len(self) -> int:
    return self.layers[0].keys.shape[1]


def last_real_index(padding_mask) -> jax.Array:  # [batch, seq] bool -> [batch] int32
  """Index of the last True per row (0 for a row with none)."""
  seq = padding_mask.shape[1]
  index = jnp.where(padding_mask, jnp.arange(seq, dtype=jnp.int32), -1)
  return jnp.maximum(jnp.max(index, axis=1), 0)


def _take_rows(x, index):  # x [batch, seq, ...], index [batch] -> [batch, ...]
  return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


class Decoder(nn.Module):
  """Causal Transformer LM; logits are float32."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    if cfg.kind != "decoder":
      raise ValueError(f"Decoder needs kind='decoder', got {cfg.kind!r}.")
    self.embeddings = Embeddings(cfg, token_types=False)
    self.transformer = Transformer(cfg)
    if cfg.num_labels:
      self.classifier = ClassificationHead(cfg)

  def __call__(
      self,
      input_ids,  # [batch, seq] int32
      *,
      positions=None,  # [batch, seq] int; default 0..seq-1
      segment_ids=None,  # [batch, seq] int; documents of a packed row
      deterministic: bool = True,
  ):  # -> logits [batch, seq, vocab] float32
    if positions is None:
      positions = default_positions(input_ids)
    x = self.embed(input_ids, positions, deterministic=deterministic)
    hidden = self.hidden_states(
        x, positions=positions, segment_ids=segment_ids,
        deterministic=deterministic)
    if self.cfg.num_labels and self.is_initializing():
      # init only traces __call__; touch the classifier so its parameters
      # exist in the tree that `classify` and checkpoints expect.
      self.classifier(hidden[:, -1])
    return self.embeddings.attend(hidden)

  def final_hidden(
      self,
      input_ids,  # [batch, seq] int32
      *,
      positions=None,  # [batch, seq] int; default 0..seq-1
      segment_ids=None,  # [batch, seq] int
      deterministic: bool = True,
  ):  # -> (hidden [batch, seq, hidden] compute dtype, table [vocab, hidden])
    """`__call__` without its output layer: the hidden states after the final LN
    and the tied output table, whose product is the logits. The chunked LM
    loss (objectives.chunked_loss.chunked_lm_cross_entropy) takes these, so that
    the [batch, seq, vocab] logits never exist whole."""
    if positions is None:
      positions = default_positions(input_ids)
    x = self.embed(input_ids, positions, deterministic=deterministic)
    hidden = self.hidden_states(
        x, positions=positions, segment_ids=segment_ids, deterministic=deterministic)
    return hidden, self.embeddings.output_table()

  def embed(self, input_ids, positions, deterministic: bool = True):
    """Token (+ learned position) embeddings [batch, seq, hidden]."""
    return self.embeddings(input_ids, positions, deterministic=deterministic)

  def hidden_states(
      self,
      x,  # [batch, seq, hidden] embeddings
      *,
      positions=None,  # [batch, seq] int
      segment_ids=None,  # [batch, seq] int
      padding_mask=None,  # [batch, seq] bool, True = real token
      deterministic: bool = True,
  ):  # -> [batch, seq, hidden], after the final LN (pre-LN)
    """The stack of blocks under causal attention, from embeddings."""
    if positions is None:
      positions = default_positions(x[..., 0])
    mask = AttentionMask(
        causal=True, segment_ids=segment_ids, key_padding_mask=padding_mask)
    hidden, _ = self.transformer(x, positions, mask, deterministic)
    return hidden

  def classify(
      self,
      input_ids,  # [batch, seq] int32, right-padded
      token_type_ids=None,  # ignored: GPT has no token types (shared signature)
      padding_mask=None,  # [batch, seq] bool, True = real token
      *,
      deterministic: bool = True,
  ):  # -> [batch, num_labels] float32
    """Sequence classification from the hidden state of the last real token."""
    del token_type_ids
    if not self.cfg.num_labels:
      raise ValueError("classify needs a config with num_labels > 0.")
    if padding_mask is None:
      padding_mask = jnp.ones(input_ids.shape, jnp.bool_)
    positions = default_positions(input_ids)
    x = self.embed(input_ids, positions, deterministic=deterministic)
    hidden = self.hidden_states(
        x, positions=positions, padding_mask=padding_mask,
        deterministic=deterministic)
    pooled = _take_rows(hidden, last_real_index(padding_mask))
    return self.classifier(pooled, deterministic=deterministic)

  def prefill(
      self,
      input_ids,  # [batch, prompt_len] int32, right-padded
      lengths=None,  # [batch] int: real prompt lengths; None = prompt_len
      *,
      max_len: int | None = None,  # cache slots; None = cfg.max_len
  ):  # -> (next-token logits [batch, 1, vocab] float32, DecodeCache)
    """Runs the prompts through the kernel and fills a cache of max_len slots."""
    batch, prompt_len = input_ids.shape
    max_len = self.cfg.max_len if max_len is None else max_len
    self._check_cache_size(prompt_len, max_len)
    if lengths is None:
      lengths = jnp.full((batch,), prompt_len, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    positions = default_positions(input_ids)
    x = self.embed(input_ids, positions)
    # Causal alone suffices: with right padding a real token never sees the
    # padding after it; padded rows compute values nobody reads.
    hidden, kvs = self.transformer(
        x, positions, AttentionMask(causal=True), True)
    cache = DecodeCache(
        layers=tuple(kv.padded_to(max_len) for kv in kvs), lengths=lengths)
    last = _take_rows(hidden, jnp.maximum(lengths - 1, 0))[:, None]
    return self.embeddings.attend(last), cache

  def decode_step(
      self,
      token,  # [batch, 1] int32: the token at position cache.lengths
      cache: DecodeCache,
  ):  # -> (logits [batch, 1, vocab] float32, DecodeCache)
    """Appends one token per row to the cache and predicts the next one.

    A row whose cache is full (lengths == max_len) gets NaN logits instead of
    silently overwriting its last slot.
    """
    slots = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :]
    index = cache.lengths  # [batch]
    positions = index[:, None]
    x = self.embed(token, positions)
    # q_len = 1: the bottom-right causal diagonal would let the query see every
    # slot, so visibility is the padding mask alone.
    mask = AttentionMask(causal=False, key_padding_mask=slots <= index[:, None])
    hidden, kvs = self.transformer(
        x, positions, mask, True, cache.layers, index)
    logits = self.embeddings.attend(hidden)
    logits = jnp.where((index < cache.max_len)[:, None, None], logits, jnp.nan)
    return logits, DecodeCache(layers=kvs, lengths=index + 1)

  def _check_cache_size(self, prompt_len: int, max_len: int):
    if max_len < prompt_len:
      raise ValueError(
          f"max_len ({max_len}) is shorter than the prompt ({prompt_len}).")
    if self.cfg.position == "learned" and max_len > self.cfg.max_len:
      raise ValueError(
          f"max_len ({max_len}) exceeds the learned position table"
          f" (cfg.max_len = {self.cfg.max_len}).")
