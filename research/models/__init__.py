"""The model library: one config, one block, the encoder, decoder and encoder-decoder.

  config.py     ModelConfig (every architectural and numerical choice) and presets
  attention.py  multi-head / grouped-query self- and cross-attention through
                kernels.dot_product_attention, rotary embeddings, the key/value cache
  layers.py     embeddings, the MLP and the one Transformer block all models share
  encoder.py    BERT-style bidirectional encoder: MLM and NSP heads, classifier,
                extractive-QA span head
  decoder.py    GPT-style causal decoder: tied LM head, prefill + cached decoding
  encoder_decoder.py  the original Transformer for seq2seq: encoder, decoder with
                cross-attention, cached decoding with the source's keys kept
  hf_import.py  Hugging Face BERT / GPT-2 checkpoints -> (ModelConfig, params)
  resolved_attention.py  what each attention of a model resolves to on this
                backend ("auto" per call), for the commands' output

This module turns a ModelConfig into a module and its parameters (how a model
runs on a batch is the objective's: research.objectives):

  model = build_model(cfg)
  params = init_params(cfg, jax.random.key(0))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fusedlm.research.models.config import ModelConfig
from fusedlm.research.models.decoder import Decoder
from fusedlm.research.models.encoder import Encoder
from fusedlm.research.models.encoder_decoder import EncoderDecoder

_MODELS = {"encoder": Encoder, "decoder": Decoder, "encoder_decoder": EncoderDecoder}


def build_model(cfg: ModelConfig) -> nn.Module:
  """The Encoder, Decoder or EncoderDecoder that cfg.kind names."""
  return _MODELS[cfg.kind](cfg)


def dummy_inputs(cfg: ModelConfig, batch: int = 1, seq: int = 8) -> tuple:
  """Positional arguments of __call__ that trace every parameter (for init)."""
  ids = jnp.zeros((batch, min(seq, cfg.max_len)), jnp.int32)
  if cfg.kind == "encoder":
    return ids, jnp.zeros_like(ids), jnp.ones(ids.shape, jnp.bool_)
  if cfg.kind == "encoder_decoder":
    return ids, ids  # source, target inputs
  return (ids,)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Freshly initialised parameters, in cfg.param_dtype.

  The parameters do not depend on the attention implementation, so init
  traces the model with the XLA reference: initialising (and
  `abstract_params`) needs no kernel, nor the device a kernel runs on.
  """
  # Jitted: op-by-op initialisation of a whole model is many small compiles.
  model = build_model(cfg.replace(attention="xla"))
  init = jax.jit(lambda rng: model.init(rng, *dummy_inputs(cfg)))
  return init(rng)["params"]


def abstract_params(cfg: ModelConfig):
  """Shapes and dtypes of `init_params`' tree (jax.eval_shape allocates nothing)."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.05) -> dict:
  """Parameters of init's tree and dtypes, every leaf drawn on the host by numpy.

  No XLA compile (init's RNG program takes seconds to compile on a CPU), and
  nothing is left at a trivial value: weights and biases ~ N(0, std^2),
  LayerNorm scales ~ 1 + N(0, std^2). For tests and smoke runs; train from
  `init_params`.
  """
  shapes = abstract_params(cfg)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    value = rng.normal(0.0, std, leaf.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value = value + 1.0
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def count_params(cfg: ModelConfig) -> int:
  """Parameters of the model, from shapes only (jax.eval_shape allocates nothing).

  Tied weights count once: the LM / MLM decoder reuses the token embedding.
  Biases, LayerNorm scales and offsets, the position table and every head the
  config builds are counted.
  """
  shapes = abstract_params(cfg)
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
