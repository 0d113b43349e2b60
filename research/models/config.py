"""The model configuration: one frozen dataclass for every model kind.

`ModelConfig` describes the encoder, the decoder or the encoder-decoder
(`kind`); `research.models.build_model` turns it into a Flax module. `presets`
holds the reference sizes (GPT-2 small, BERT-base, Transformer-base) and the
tiny ones every test and CPU smoke run uses:

  cfg = model_config.presets["tiny_gpt"](vocab_size=tokenizer.vocab_size)
  cfg = model_config.ModelConfig.from_dict(config.model.to_dict())
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from fusedlm.kernels import IMPLEMENTATIONS
from fusedlm.kernels.mosaic import coverage as mosaic_coverage

KINDS = ("encoder", "decoder", "encoder_decoder")
POSITIONS = ("learned", "rotary", "relative")
NORMS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architectural and numerical choice of one model."""

  # "encoder" (BERT-style, bidirectional), "decoder" (GPT-style, causal) or
  # "encoder_decoder" (the original Transformer: num_layers encoder blocks and
  # num_layers decoder blocks with cross-attention).
  kind: str = "decoder"
  # Rows of the token embedding (and columns of the tied output layer).
  vocab_size: int = 8192
  # Width of the residual stream.
  hidden_size: int = 128
  # Transformer blocks.
  num_layers: int = 4
  # Query heads; hidden_size must be a multiple of it (head_dim = hidden / heads).
  num_heads: int = 4
  # Key/value heads (grouped-query attention); None = num_heads (multi-head).
  num_kv_heads: int | None = None
  # Width of the MLP's hidden layer.
  mlp_dim: int = 512
  # Longest sequence: rows of the learned position table, cap of the KV cache.
  # Encoder-decoder: the longest source and the longest target, each.
  max_len: int = 256
  # "learned" absolute position embeddings, "rotary" (RoPE on q and k) or
  # "relative": T5's learned relative position bias, added to the attention
  # scores of every layer (each layer its own table), no position embedding.
  position: str = "learned"
  # Base of the rotary frequencies (RoFormer: 10000); unused otherwise.
  rotary_base: float = 10_000.0
  # position="relative": buckets of key-query distances (T5: 32), and the
  # distance from which buckets stop growing (T5: 128). Unused otherwise.
  relative_buckets: int = 32
  relative_max_distance: int = 128
  # "pre": x + f(LN(x)), final LN (GPT-2). "post": LN(x + f(x)), LN on the
  # embeddings (original BERT).
  norm: str = "pre"
  # MLP nonlinearity: "gelu" (exact, erf; BERT) or "gelu_tanh" (GPT-2's).
  activation: str = "gelu"
  # Dropout on embeddings and on each sublayer's output before the residual add.
  dropout: float = 0.0
  # Dropout on attention probabilities (BERT, GPT-2: 0.1), in training only;
  # the "mosaic", "pallas" and "xla" implementations apply it inside attention
  # with the same random bits, "cudnn" refuses it.
  attention_dropout: float = 0.0
  # Local attention: a query sees keys at most sliding_window - 1 positions
  # away (a decoder: the last sliding_window keys, itself included, as
  # Mistral); 0 = every key. The fused kernel skips the blocks outside it.
  sliding_window: int = 0
  # Gemma 2's logit soft-cap: scores become c * tanh(scores / c); 0.0 = none.
  attention_soft_cap: float = 0.0
  # Standard deviation of the normal initialisation of every weight matrix and
  # embedding table (Hugging Face's initializer_range; BERT and GPT-2: 0.02;
  # pre-LN residual projections take init_std / sqrt(2 num_layers)).
  init_std: float = 0.02
  # Epsilon of every LayerNorm (GPT-2: 1e-5, BERT: 1e-12).
  layer_norm_eps: float = 1e-5
  # Encoder: rows of the token-type (segment A/B) embedding. Decoder: unused.
  type_vocab_size: int = 2
  # Compute dtype of activations and matmul inputs; softmax, losses and all
  # logits are float32 whatever this is.
  dtype: str = "bfloat16"
  # Storage dtype of the parameters (and of the optimizer's view of them).
  param_dtype: str = "float32"
  # Rematerialise each block's activations in the backward pass (saves memory).
  remat: bool = False
  # Tokens whose output-layer logits the causal LM loss (decoder) computes at
  # once; 0 = every token of the batch ([batch, seq, vocab] float32 logits
  # materialise, 2.5 GB for GPT-2 small at 12 x 1024). > 0: the tied output
  # layer and the cross-entropy run over chunks of this many tokens, each
  # recomputed in the backward, so only one chunk's logits exist at a time.
  # Same loss, in float32; how the model runs, not what it computes (a resume
  # may change it).
  logits_chunk: int = 0
  # Attention implementation: "auto" (per call: mosaic on a Hopper GPU where
  # the kernel takes the call, pallas on other GPUs and for the rest, tpu on a
  # TPU, xla elsewhere), "pallas", "xla", "cudnn", "mosaic" (Hopper;
  # bfloat16/float16) or "tpu" (bfloat16/float32); see kernels.attention. The
  # commands name what each layer resolved to.
  attention: str = "auto"
  # Classes of the sequence-classification head; 0 = no head. The encoder pools
  # the first token, the decoder the last real one.
  num_labels: int = 0
  # Encoder: build the masked-LM head (transform, LayerNorm, tied decoder with
  # bias). False for a bare trunk (Hugging Face BertModel). Decoder: unused,
  # its tied LM head always exists.
  mlm: bool = True
  # Encoder: build the next-sentence-prediction head (pooler + 2-way linear).
  nsp: bool = False
  # Encoder: build the extractive-QA span head, a linear layer from every
  # position's hidden state to its (start, end) logits (Devlin et al. 2019,
  # section 4.2; Hugging Face's BertForQuestionAnswering qa_outputs).
  span_head: bool = False
  # Encoder-decoder: one token table for the source, the target and the output
  # layer (Vaswani et al. 2017, section 3.4; T5), which needs one vocabulary
  # for both languages. False: the encoder has its own table; the output layer
  # stays tied to the decoder's. Other kinds: unused.
  share_embeddings: bool = True

  def __post_init__(self):
    _validate(self)

  @property
  def kv_heads(self) -> int:
    """Key/value heads, num_kv_heads resolved."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def has_pooler(self) -> bool:
    """The encoder's first-token pooler feeds the NSP and classification heads."""
    return self.kind == "encoder" and (self.nsp or self.num_labels > 0)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """A config from plain values; ValueError names unknown keys and bad values."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(
          f"unknown ModelConfig keys {unknown}; known keys: {sorted(known)}."
      )
    return cls(**{k: _coerce(k, v) for k, v in d.items()})

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


_INT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
               "max_len", "type_vocab_size", "num_labels", "sliding_window",
               "relative_buckets", "relative_max_distance", "logits_chunk")
# Fields that change how a model runs (kernels, memory), not its parameters or
# what it computes: a resume may change them (runs.run_files.check_resumable).
RUNTIME_FIELDS = frozenset({"attention", "remat", "logits_chunk"})
_FLOAT_FIELDS = ("rotary_base", "dropout", "attention_dropout", "layer_norm_eps",
                 "attention_soft_cap", "init_std")
_BOOL_FIELDS = ("remat", "mlm", "nsp", "span_head", "share_embeddings")
_CHOICES = {
    "kind": KINDS,
    "position": POSITIONS,
    "norm": NORMS,
    "activation": ACTIVATIONS,
    "dtype": DTYPES,
    "param_dtype": DTYPES,
    "attention": IMPLEMENTATIONS,
}


def _coerce(name: str, value):
  """Accepts an int where a float is meant (ConfigDict and JSON hand back 0, 1)."""
  if name in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _validate(cfg: ModelConfig):
  for name in _INT_FIELDS:
    value = getattr(cfg, name)
    if not _is_int(value):
      raise ValueError(f"ModelConfig.{name} must be an int, got {value!r}.")
    least = 0 if name in ("num_labels", "sliding_window", "logits_chunk") else 1
    if value < least:
      raise ValueError(f"ModelConfig.{name} must be >= {least}, got {value}.")
  for name in _FLOAT_FIELDS:
    if not isinstance(getattr(cfg, name), float):
      raise ValueError(
          f"ModelConfig.{name} must be a float, got {getattr(cfg, name)!r}.")
  for name in _BOOL_FIELDS:
    if not isinstance(getattr(cfg, name), bool):
      raise ValueError(
          f"ModelConfig.{name} must be a bool, got {getattr(cfg, name)!r}.")
  for name, choices in _CHOICES.items():
    if getattr(cfg, name) not in choices:
      raise ValueError(
          f"ModelConfig.{name} must be one of {', '.join(choices)}; got"
          f" {getattr(cfg, name)!r}."
      )
  if cfg.num_kv_heads is not None and (
      not _is_int(cfg.num_kv_heads) or cfg.num_kv_heads < 1):
    raise ValueError(
        f"ModelConfig.num_kv_heads must be None or a positive int, got"
        f" {cfg.num_kv_heads!r}.")
  if cfg.hidden_size % cfg.num_heads:
    raise ValueError(
        f"hidden_size ({cfg.hidden_size}) must be a multiple of num_heads"
        f" ({cfg.num_heads}).")
  if cfg.num_heads % cfg.kv_heads:
    raise ValueError(
        f"num_heads ({cfg.num_heads}) must be a multiple of num_kv_heads"
        f" ({cfg.kv_heads}) for grouped-query attention.")
  if cfg.position == "rotary" and cfg.head_dim % 2:
    raise ValueError(
        f"rotary positions rotate pairs of features: head_dim ({cfg.head_dim})"
        " must be even.")
  if not 0.0 <= cfg.dropout < 1.0:
    raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {cfg.dropout}.")
  if not 0.0 <= cfg.attention_dropout < 1.0:
    raise ValueError(
        f"ModelConfig.attention_dropout must be in [0, 1), got"
        f" {cfg.attention_dropout}.")
  if cfg.attention_soft_cap < 0.0:
    raise ValueError(
        f"ModelConfig.attention_soft_cap must be >= 0 (0 = none), got"
        f" {cfg.attention_soft_cap}.")
  variants = [name for name, on in (
      ("attention_dropout", cfg.attention_dropout > 0.0),
      ("sliding_window", cfg.sliding_window > 0),
      ("attention_soft_cap", cfg.attention_soft_cap > 0.0),
      ("position='relative'", cfg.position == "relative")) if on]
  if cfg.attention == "tpu" and cfg.dtype == "float16":
    raise ValueError("attention='tpu' takes dtype bfloat16 or float32 (TPUs have"
                     " no float16 arithmetic).")
  if cfg.attention == "cudnn" and variants:
    raise ValueError(
        f"attention={cfg.attention!r} does not take {', '.join(variants)}; use"
        " attention='pallas', 'xla' or 'auto'.")
  if cfg.attention == "mosaic":
    # The kernel's own predicate; position="relative" is an attention bias.
    refusal = mosaic_coverage.refusal(
        dtype=cfg.dtype, head_dim=cfg.head_dim, v_head_dim=cfg.head_dim,
        variants=("bias",) if cfg.position == "relative" else ())
    if refusal is not None:
      raise ValueError(f"attention='mosaic': {refusal}; use attention='pallas',"
                       " 'xla' or 'auto'.")
  if cfg.init_std <= 0.0:
    raise ValueError(f"ModelConfig.init_std must be > 0, got {cfg.init_std}.")
  if cfg.layer_norm_eps <= 0.0:
    raise ValueError(
        f"ModelConfig.layer_norm_eps must be > 0, got {cfg.layer_norm_eps}.")
  if cfg.kind != "encoder" and cfg.nsp:
    raise ValueError("nsp=True needs kind='encoder': the NSP head pools the"
                     " first token of a bidirectional encoder.")
  if cfg.kind != "encoder" and cfg.span_head:
    raise ValueError("span_head=True needs kind='encoder': extractive QA reads every"
                     " position of a bidirectional encoder.")
  if cfg.kind == "encoder_decoder" and cfg.num_labels:
    raise ValueError("num_labels > 0 needs kind='encoder' or 'decoder': the"
                     " encoder-decoder has no classification head.")


# Presets. Each takes overrides, e.g. tiny_gpt(vocab_size=tokenizer.vocab_size).


def gpt2_small(**overrides) -> ModelConfig:
  """GPT-2 small (Radford et al. 2019): 124.4M parameters, embeddings tied."""
  return ModelConfig(
      kind="decoder", vocab_size=50257, hidden_size=768, num_layers=12,
      num_heads=12, mlp_dim=3072, max_len=1024, position="learned", norm="pre",
      activation="gelu_tanh", dropout=0.1, layer_norm_eps=1e-5,
  ).replace(**overrides)


def bert_base(**overrides) -> ModelConfig:
  """BERT-base, uncased vocabulary (Devlin et al. 2019), with MLM and NSP heads."""
  return ModelConfig(
      kind="encoder", vocab_size=30522, hidden_size=768, num_layers=12,
      num_heads=12, mlp_dim=3072, max_len=512, position="learned", norm="post",
      activation="gelu", dropout=0.1, attention_dropout=0.1,
      layer_norm_eps=1e-12, type_vocab_size=2, mlm=True, nsp=True,
  ).replace(**overrides)


def tiny_gpt(**overrides) -> ModelConfig:
  """A GPT-2-shaped decoder of ~1.9M parameters that trains on a laptop CPU."""
  return ModelConfig(
      kind="decoder", vocab_size=8192, hidden_size=128, num_layers=4,
      num_heads=4, mlp_dim=512, max_len=256, position="learned", norm="pre",
      activation="gelu_tanh", dropout=0.0, layer_norm_eps=1e-5,
  ).replace(**overrides)


def tiny_bert(**overrides) -> ModelConfig:
  """A BERT-shaped encoder of ~1.9M parameters (MLM + NSP) for CPU runs."""
  return ModelConfig(
      kind="encoder", vocab_size=8192, hidden_size=128, num_layers=4,
      num_heads=4, mlp_dim=512, max_len=256, position="learned", norm="post",
      activation="gelu", dropout=0.0, layer_norm_eps=1e-12, type_vocab_size=2,
      mlm=True, nsp=True,
  ).replace(**overrides)


def transformer_base(**overrides) -> ModelConfig:
  """Transformer-base (Vaswani et al. 2017, table 3): 6 + 6 layers, width 512,
  8 heads, MLP 2048, dropout 0.1, one shared 32k table (60.8M parameters; T5-small
  is the same size). Pre-LN and GELU rather than the paper's post-LN and ReLU:
  pre-LN trains without the paper's careful warm-up (Xiong et al. 2020)."""
  return ModelConfig(
      kind="encoder_decoder", vocab_size=32000, hidden_size=512, num_layers=6,
      num_heads=8, mlp_dim=2048, max_len=256, position="learned", norm="pre",
      activation="gelu", dropout=0.1, layer_norm_eps=1e-6, share_embeddings=True,
  ).replace(**overrides)


def tiny_seq2seq(**overrides) -> ModelConfig:
  """A 2 + 2-layer encoder-decoder of width 128 (1.07M parameters with a 1k
  vocabulary) that learns the built-in synthetic translation task on a CPU."""
  return ModelConfig(
      kind="encoder_decoder", vocab_size=1024, hidden_size=128, num_layers=2,
      num_heads=4, mlp_dim=512, max_len=64, position="learned", norm="pre",
      activation="gelu", dropout=0.0, layer_norm_eps=1e-6, share_embeddings=True,
  ).replace(**overrides)


presets: dict[str, Callable[..., ModelConfig]] = {
    "gpt2_small": gpt2_small,
    "bert_base": bert_base,
    "tiny_gpt": tiny_gpt,
    "tiny_bert": tiny_bert,
    "transformer_base": transformer_base,
    "tiny_seq2seq": tiny_seq2seq,
}
