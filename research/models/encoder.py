"""BERT-style encoder: bidirectional attention, padding mask, MLM / NSP / class heads.

  outputs = model.apply(variables, input_ids, token_type_ids, padding_mask)
  outputs["hidden"]        [batch, seq, hidden]       last layer (after the final
                                                      LN when pre-LN)
  outputs["mlm_logits"]    [batch, seq, vocab]  f32   if cfg.mlm
  outputs["nsp_logits"]    [batch, 2]           f32   if cfg.nsp (0 = is next)
  outputs["class_logits"]  [batch, num_labels]  f32   if cfg.num_labels
  outputs["span_logits"]   [batch, seq, 2]      f32   if cfg.span_head: start and
                                                      end logits of each position

With `mlm_positions` [batch, P] (int, P fixed; a slot >= seq is empty), the MLM
head runs at those positions only, as the original BERT's gather_indexes does:
  outputs["mlm_logits"]    [batch, P, vocab]    f32   row b, slot p: the logits
                                                      at position mlm_positions[b, p]
                                                      (an empty slot: the head of a
                                                      zero vector, to be ignored)
  outputs["mlm_positions"] [batch, P]                 the positions, for the loss
Pretraining gathers because the tied output layer applied at every position
costs more than the rest of a tiny model, while only ~15% of positions have a
label.

Heads as in Devlin et al. (2019) and Hugging Face's BertForPreTraining:
  MLM: Dense(hidden) -> GELU -> LayerNorm -> tied token embedding^T + bias.
  Span (extractive QA): Dense(2) of every position's hidden state.
  Pooler: Dense(hidden) -> tanh on the first ([CLS]) token; NSP and
  classification read the pooled vector.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from fusedlm.research.models.attention import AttentionMask
from fusedlm.research.models.config import ModelConfig
from fusedlm.research.models.layers import (
  ClassificationHead,
  Embeddings,
  Transformer,
  default_positions,
  dense,
  layer_norm,
)


class MlmTransform(nn.Module):
  """Dense -> GELU -> LayerNorm before the tied MLM decoder."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):  # [batch, seq, hidden] -> same
    cfg = self.cfg
    x = dense(cfg, cfg.hidden_size, "dense")(x)
    x = nn.gelu(x, approximate=cfg.activation == "gelu_tanh")
    return layer_norm(cfg, "norm")(x)


class Pooler(nn.Module):
  """tanh(Dense(hidden)) of the first token: [B, T, hidden] -> [B, hidden]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden):
    return jnp.tanh(dense(self.cfg, self.cfg.hidden_size, "dense")(hidden[:, 0]))


class Encoder(nn.Module):
  """Bidirectional Transformer with the heads the config asks for."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    if cfg.kind != "encoder":
      raise ValueError(f"Encoder needs kind='encoder', got {cfg.kind!r}.")
    self.embeddings = Embeddings(cfg, token_types=True)
    self.transformer = Transformer(cfg)
    if cfg.mlm:
      self.mlm_transform = MlmTransform(cfg)
      self.mlm_bias = self.param(
          "mlm_bias", nn.initializers.zeros, (cfg.vocab_size,), cfg.params_dtype)
    if cfg.has_pooler:
      self.pooler = Pooler(cfg)
    if cfg.nsp:
      self.nsp_head = dense(cfg, 2, "nsp_head", dtype=jnp.float32)
    if cfg.num_labels:
      self.classifier = ClassificationHead(cfg)
    if cfg.span_head:
      self.span_head = dense(cfg, 2, "span_head", dtype=jnp.float32)

  def __call__(
      self,
      input_ids,  # [batch, seq] int32
      token_type_ids=None,  # [batch, seq] int; None = all 0 (segment A)
      padding_mask=None,  # [batch, seq] bool, True = real token; None = all real
      *,
      deterministic: bool = True,
      mlm_positions=None,  # [batch, P] int; None = the MLM head at every position
  ) -> dict:
    cfg = self.cfg
    hidden = self._encode(input_ids, token_type_ids, padding_mask, deterministic)
    outputs = {"hidden": hidden}
    if cfg.mlm:
      at = hidden
      if mlm_positions is not None:
        # An empty slot (>= seq) reads zeros and gets no gradient.
        at = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1,
                                 mode="fill", fill_value=0)
        outputs["mlm_positions"] = mlm_positions
      transformed = self.mlm_transform(at)
      outputs["mlm_logits"] = (
          self.embeddings.attend(transformed) + self.mlm_bias.astype(jnp.float32))
    if cfg.has_pooler:
      pooled = self.pooler(hidden).astype(jnp.float32)
      if cfg.nsp:
        outputs["nsp_logits"] = self.nsp_head(pooled)
      if cfg.num_labels:
        outputs["class_logits"] = self.classifier(
            pooled, deterministic=deterministic)
    if cfg.span_head:
      outputs["span_logits"] = self.span_head(hidden.astype(jnp.float32))
    return outputs

  def classify(
      self,
      input_ids,  # [batch, seq] int32
      token_type_ids=None,  # [batch, seq] int
      padding_mask=None,  # [batch, seq] bool
      *,
      deterministic: bool = True,
  ):  # -> [batch, num_labels] float32, without computing the MLM logits
    if not self.cfg.num_labels:
      raise ValueError("classify needs a config with num_labels > 0.")
    hidden = self._encode(input_ids, token_type_ids, padding_mask, deterministic)
    pooled = self.pooler(hidden).astype(jnp.float32)
    return self.classifier(pooled, deterministic=deterministic)

  def span_logits(
      self,
      input_ids,  # [batch, seq] int32
      token_type_ids=None,  # [batch, seq] int
      padding_mask=None,  # [batch, seq] bool
      *,
      deterministic: bool = True,
  ):  # -> [batch, seq, 2] float32: (start, end) logits, without the MLM logits
    if not self.cfg.span_head:
      raise ValueError("span_logits needs a config with span_head=True.")
    hidden = self._encode(input_ids, token_type_ids, padding_mask, deterministic)
    return self.span_head(hidden.astype(jnp.float32))

  def embed(self, input_ids, token_type_ids=None, deterministic: bool = True):
    """Token + position + token-type embeddings [batch, seq, hidden]."""
    return self.embeddings(
        input_ids, default_positions(input_ids), token_type_ids,
        deterministic=deterministic)

  def hidden_states(
      self,
      x,  # [batch, seq, hidden] embeddings
      padding_mask=None,  # [batch, seq] bool
      *,
      deterministic: bool = True,
  ):  # -> [batch, seq, hidden]
    """The stack of blocks under bidirectional attention, from embeddings."""
    positions = default_positions(x[..., 0])
    mask = AttentionMask(causal=False, key_padding_mask=padding_mask)
    hidden, _ = self.transformer(x, positions, mask, deterministic)
    return hidden

  def _encode(self, input_ids, token_type_ids, padding_mask, deterministic):
    if padding_mask is not None:
      padding_mask = padding_mask.astype(jnp.bool_)
    x = self.embed(input_ids, token_type_ids, deterministic=deterministic)
    return self.hidden_states(x, padding_mask, deterministic=deterministic)
