"""Masked language modelling (+ next-sentence prediction) with an encoder (BERT)."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from fusedlm.research import data as data_lib
from fusedlm.research.data import run_data
from fusedlm.research.objectives.metrics import row_weights, safe_mean, weighted_cross_entropy
from fusedlm.research.objectives.objective import Objective, pretraining_model_config


def mlm_loss(
    outputs: dict,  # Encoder outputs: mlm_logits [B, T, V] (or [B, P, V] with
                    # mlm_positions [B, P]), nsp_logits [B, 2]
    batch: dict,  # mlm_labels [B, T], mlm_weights [B, T], nsp_labels [B]
    nsp: bool = False,
):
  """Masked-LM cross-entropy over masked positions only, plus NSP if asked.

  The loss is mean MLM loss + mean NSP loss, as in BERT's pre-training. A
  label < 0 (Hugging Face's -100) is ignored even where its weight is set.
  When the encoder computed its logits at gathered positions
  (outputs["mlm_positions"]), labels and weights are gathered the same way; an
  empty slot (a position >= T) weighs 0.
  """
  labels = batch["mlm_labels"]
  weights = batch["mlm_weights"]
  rows = row_weights(batch, labels.shape[0])
  positions = outputs.get("mlm_positions")
  if positions is not None:
    gather = lambda x: jnp.take_along_axis(x, positions, axis=1, mode="fill", fill_value=0)
    labels, weights = gather(labels), gather(weights)
  weights = weights.astype(jnp.float32) * (labels >= 0) * rows[:, None]
  metrics = weighted_cross_entropy(outputs["mlm_logits"], labels, weights)
  loss = safe_mean(metrics["loss_sum"], metrics["count"])
  if nsp:
    nsp_metrics = weighted_cross_entropy(
        outputs["nsp_logits"], batch["nsp_labels"], rows)
    metrics.update({f"nsp_{k}": v for k, v in nsp_metrics.items()})
    loss = loss + safe_mean(nsp_metrics["loss_sum"], nsp_metrics["count"])
  return loss, metrics


def outputs(model, variables, batch: dict, *, deterministic: bool = True, rngs=None):
  """The encoder's output dict (mlm_logits, nsp_logits) from batch["input_ids"],
  ["token_type_ids"], ["padding_mask"]; the MLM logits at batch["mlm_positions"]
  only when the batch has them (research.data.MLMBatches' do)."""
  return model.apply(
      variables, batch["input_ids"], batch.get("token_type_ids"),
      batch.get("padding_mask"), deterministic=deterministic, rngs=rngs,
      mlm_positions=batch.get("mlm_positions"))


def _batches(config, tokens, **common):
  d = config.data
  return data_lib.MLMBatches(
      tokens, **common, nsp=bool(config.nsp), mask_prob=d.get("mask_prob", 0.15),
      whole_word_masking=d.get("whole_word_masking", False))


OBJECTIVE = Objective(
    name="mlm",
    fine_tunes=False,
    # The NSP head exists exactly when the objective trains it.
    model_config=lambda config, vocab_size, pretrained=None, num_labels=0: (
        pretraining_model_config(config, vocab_size, kind="encoder",
                                 nsp=bool(config.nsp))),
    outputs=outputs,
    loss=lambda outputs, batch, cfg: mlm_loss(outputs, batch, nsp=cfg.nsp),
    train_data=functools.partial(run_data.build_lm, make_batches=_batches),
    eval_data=functools.partial(run_data.lm_evaluation_batches, make_batches=_batches),
    validate=lambda config: None,
    report_keys=("loss", "perplexity", "accuracy", "nsp_loss", "nsp_accuracy"),
)
