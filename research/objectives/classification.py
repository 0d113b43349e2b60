"""Sequence classification: a pretrained encoder or decoder fine-tuned with a
classification head (fusedlm finetune)."""

from __future__ import annotations

from fusedlm.research.data import run_data
from fusedlm.research.objectives.metrics import (
    confusion_matrix,
    row_weights,
    safe_mean,
    weighted_cross_entropy,
)
from fusedlm.research.objectives.objective import Objective, check_seq_len


def classification_loss(
    logits,  # [batch, num_labels] float32
    batch: dict,  # labels [batch] int; optional weights [batch] (0 = padding example)
):
  """Cross-entropy averaged over examples (padded eval examples weighted 0)."""
  labels = batch["labels"]
  metrics = weighted_cross_entropy(logits, labels, row_weights(batch, labels.shape[0]))
  return safe_mean(metrics["loss_sum"], metrics["count"]), metrics


def outputs(model, variables, batch: dict, *, deterministic: bool = True, rngs=None):
  """Class logits [B, num_labels] (the encoder pools the first token, the
  decoder the last real one)."""
  return model.apply(
      variables, batch["input_ids"], batch.get("token_type_ids"),
      batch.get("padding_mask"), deterministic=deterministic, rngs=rngs,
      method="classify")


def model_config(config, vocab_size, pretrained=None, num_labels: int = 0):
  """The pretrained model with num_labels classes and without its pretraining
  heads (MLM, NSP), as Hugging Face's *ForSequenceClassification models; the
  run may change only how it runs (config.model: dropout, dtypes, attention, remat).
  """
  if pretrained is None:
    raise ValueError("a classification config fine-tunes a pretrained model; none given"
                     " (fusedlm finetune --init_from DIR).")
  if pretrained.vocab_size != vocab_size:
    raise ValueError(f"the tokenizer has {vocab_size} tokens but the pretrained model"
                     f" {pretrained.vocab_size}: the tokenizer is not the pretrained run's.")
  if num_labels < 2:
    raise ValueError(f"classification needs at least 2 labels, the data has {num_labels}.")
  overrides = dict(config.model.to_dict() if hasattr(config.model, "to_dict")
                   else config.model)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  cfg = pretrained.replace(num_labels=num_labels, nsp=False, **overrides)
  if cfg.kind == "encoder":
    cfg = cfg.replace(mlm=False)
  check_seq_len(config, cfg, "pretrained model")
  return cfg


def _validate(config) -> None:
  d = config.data
  if not d.task:
    raise ValueError("config.data.task is empty: name the labelled training file"
                     " (--config.data.task=train.csv) or the built-in task"
                     " 'stdlib_topics'.")
  if not 0.0 < d.validation_fraction < 1.0:
    raise ValueError("config.data.validation_fraction must be in (0, 1), got"
                     f" {d.validation_fraction}.")
  if d.seq_len < 4:
    raise ValueError(f"config.data.seq_len must be >= 4, got {d.seq_len}.")
  if not isinstance(config.init_step, int) or config.init_step < 0:
    raise ValueError(f"config.init_step must be an int >= 0 (0 = the newest"
                     f" checkpoint), got {config.init_step!r}.")


OBJECTIVE = Objective(
    name="classification",
    fine_tunes=True,
    model_config=model_config,
    outputs=outputs,
    loss=lambda outputs, batch, cfg: classification_loss(outputs, batch),
    train_data=run_data.build_classification,
    eval_data=run_data.classification_evaluation_batches,
    validate=_validate,
    # The confusion matrix, for macro-F1: evaluation only.
    eval_sums=lambda outputs, batch: {"confusion": confusion_matrix(
        outputs, batch["labels"], batch["weights"])},
    report_keys=("loss", "accuracy", "macro_f1"),
    count_unit="examples",
)
