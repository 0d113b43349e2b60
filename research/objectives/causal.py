"""Causal language modelling: next-token prediction with a decoder (GPT)."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from fusedlm.research import data as data_lib
from fusedlm.research.data import run_data
from fusedlm.research.objectives.chunked_loss import chunked_lm_cross_entropy
from fusedlm.research.objectives.metrics import (
  row_weights,
  safe_mean,
  weighted_cross_entropy,
)
from fusedlm.research.objectives.objective import Objective, pretraining_model_config


def causal_lm_loss(
    logits,  # [batch, seq, vocab] float32, or a ChunkedLogits
    batch: dict,  # targets [batch, seq] int, loss_mask [batch, seq] float32
):
  """Next-token cross-entropy averaged over the positions loss_mask keeps.

  `logits` may be the logits, or (ModelConfig.logits_chunk > 0) a
  ChunkedLogits from which the loss computes them a chunk of tokens at a time.

  The data pipeline's loss_mask is authoritative: it is 0 on padding and at
  any position whose target lies in another document of a packed row. The
  other half of respecting document boundaries is the model's: segment_ids
  stop attention from crossing them.
  """
  targets = batch["targets"]
  weights = batch.get("loss_mask")
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights * row_weights(batch, targets.shape[0])[:, None]
  if isinstance(logits, ChunkedLogits):
    metrics = chunked_lm_cross_entropy(
        logits.hidden, logits.table, targets, weights, chunk=logits.chunk,
        dtype=logits.dtype)
  else:
    metrics = weighted_cross_entropy(logits, targets, weights)
  return safe_mean(metrics["loss_sum"], metrics["count"]), metrics


@flax.struct.dataclass
class ChunkedLogits:
  """What the logits are made of, for a loss that computes them in chunks (a
  pytree: the arrays are its leaves, so jit and eval_shape pass it through)."""

  hidden: jax.Array  # [batch, seq, hidden] compute dtype, after the final LN
  table: jax.Array  # [vocab, hidden]: logits = hidden @ table^T
  chunk: int = flax.struct.field(pytree_node=False)  # tokens a chunk
  dtype: Any = flax.struct.field(pytree_node=False)  # the output layer's matmul input dtype


def outputs(model, variables, batch: dict, *, deterministic: bool = True, rngs=None):
  """Logits [B, T, V] from batch["inputs"], ["positions"], ["segment_ids"]; with
  ModelConfig.logits_chunk, the ChunkedLogits the loss makes them from."""
  kwargs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                deterministic=deterministic, rngs=rngs)
  cfg = model.cfg
  if cfg.logits_chunk:
    hidden, table = model.apply(variables, batch["inputs"], method="final_hidden", **kwargs)
    return ChunkedLogits(hidden, table, cfg.logits_chunk, cfg.compute_dtype)
  return model.apply(variables, batch["inputs"], **kwargs)


def _batches(config, tokens, **common):
  return data_lib.CausalLMBatches(tokens, **common)


def _validate(config) -> None:
  if config.get("nsp"):
    raise ValueError("config.nsp=True needs config.objective='mlm'.")


OBJECTIVE = Objective(
    name="causal",
    fine_tunes=False,
    model_config=lambda config, vocab_size, pretrained=None, num_labels=0: (
        pretraining_model_config(config, vocab_size, kind="decoder")),
    outputs=outputs,
    loss=lambda outputs, batch, cfg: causal_lm_loss(outputs, batch),
    train_data=functools.partial(run_data.build_lm, make_batches=_batches),
    eval_data=functools.partial(run_data.lm_evaluation_batches, make_batches=_batches),
    validate=_validate,
)
