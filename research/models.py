"""From a ModelConfig to a module, its parameters, and its outputs on a batch.

  model = build_model(cfg)
  params = init_params(cfg, jax.random.key(0))
  outputs = model_outputs(model, {"params": params}, batch, "causal")
  loss, metrics = objectives.loss_fn_for("causal")(outputs, batch)

`model_outputs` reads the batch keys of `research.data` for each objective and
returns what `objectives.loss_fn_for(objective)` takes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from research.decoder import Decoder
from research.encoder import Encoder
from research.model_config import ModelConfig
from research.objectives import OBJECTIVES


def build_model(cfg: ModelConfig) -> nn.Module:
  """The Encoder or Decoder that cfg.kind names."""
  return Encoder(cfg) if cfg.kind == "encoder" else Decoder(cfg)


def dummy_inputs(cfg: ModelConfig, batch: int = 1, seq: int = 8) -> tuple:
  """Positional arguments of __call__ that trace every parameter (for init)."""
  ids = jnp.zeros((batch, min(seq, cfg.max_len)), jnp.int32)
  if cfg.kind == "encoder":
    return ids, jnp.zeros_like(ids), jnp.ones(ids.shape, jnp.bool_)
  return (ids,)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Freshly initialised parameters, in cfg.param_dtype."""
  # Jitted: op-by-op initialisation of a whole model is many small compiles.
  init = jax.jit(lambda rng: build_model(cfg).init(rng, *dummy_inputs(cfg)))
  return init(rng)["params"]


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.05) -> dict:
  """Parameters of init's tree and dtypes, every leaf drawn on the host by numpy.

  No XLA compile (init's RNG program takes seconds to compile on a CPU), and
  nothing is left at a trivial value: weights and biases ~ N(0, std^2),
  LayerNorm scales ~ 1 + N(0, std^2). For tests and smoke runs; train from
  `init_params`.
  """
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
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
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def model_outputs(
    model: nn.Module,
    variables: dict,
    batch: dict,
    objective: str,
    *,
    deterministic: bool = True,
    rngs: dict | None = None,  # {"dropout": key} when not deterministic
):
  """Runs the model as `objective` needs; returns the input of its loss.

  causal: logits [B, T, V] from batch["inputs"], ["positions"], ["segment_ids"].
  mlm: the encoder's output dict from ["input_ids"], ["token_type_ids"],
    ["padding_mask"].
  classification: class logits [B, num_labels] from the same keys (the encoder
    pools the first token, the decoder the last real one).
  """
  if objective == "causal":
    return model.apply(
        variables, batch["inputs"], positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"), deterministic=deterministic,
        rngs=rngs)
  if objective == "mlm":
    return model.apply(
        variables, batch["input_ids"], batch.get("token_type_ids"),
        batch.get("padding_mask"), deterministic=deterministic, rngs=rngs)
  if objective == "classification":
    return model.apply(
        variables, batch["input_ids"], batch.get("token_type_ids"),
        batch.get("padding_mask"), deterministic=deterministic, rngs=rngs,
        method="classify")
  raise ValueError(
      f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}.")
