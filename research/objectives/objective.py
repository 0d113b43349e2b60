"""The `Objective` record: everything that differs between objectives."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fusedlm.research.models import config as model_config


@dataclasses.dataclass(frozen=True)
class Objective:
  """One objective, as every other part of fusedlm sees it.

  Attributes:
    name: the value of config.objective.
    fine_tunes: starts from a pretrained run (fusedlm finetune --init_from)
      and has the fine-tuning config schema; False for pretraining.
    model_config: (config, vocab_size, pretrained=None, num_labels=0) ->
      ModelConfig; refuses a model this objective cannot train.
    outputs: (model, variables, batch, *, deterministic=True, rngs=None) ->
      what `loss` takes (logits, or the encoder's output dict).
    loss: (outputs, batch, model_cfg) -> (loss_mean, metric sums).
    train_data: (config, tokenizer | None) -> run_data.RunData.
    eval_data: (config, tokenizer, batch_size, data | None, label_names) ->
      (batch maker with eval_batches(), description): the run's validation
      split, or other data named by `fusedlm evaluate --data`.
    validate: (config) -> None; raises ValueError for settings this
      objective does not take.
    eval_sums: (outputs, batch) -> extra sums only evaluation needs, or None.
    report_keys: summary metrics the commands print, in order.
    count_unit: what the summary's `tokens` (the `count` sum) counts.
    config_defaults: (pretraining defaults, or fine-tuning's when
      fine_tunes) -> ConfigDict: those extended to every field of this
      objective's run config with its default, i.e. its schema
      (research.run_config.defaults / finetune_defaults and validate); None
      = those defaults as they are.
    extra_evaluation: (saved run, params, eval batch maker, max_batches) ->
      {"metrics": {...}, "outputs": {name: [line, ...] or {...}}} for what is
      not a sum over batches (seq2seq: decode the split, score BLEU and chrF;
      qa: answer the questions, score exact match and F1); None = none.
      fusedlm evaluate adds the metrics to its summary and writes each
      output beside its JSON: a list one item a line (step_<N>.<name>.txt),
      a dict as JSON (step_<N>.<name>.json).
    text_scores: (hypotheses, references per hypothesis) -> metrics of
      decoded text against references (seq2seq: BLEU and chrF;
      summarization: ROUGE), for fusedlm translate --reference; None = none.
  """

  name: str
  fine_tunes: bool
  model_config: Callable[..., Any]
  outputs: Callable[..., Any]
  loss: Callable[..., Any]
  train_data: Callable[..., Any]
  eval_data: Callable[..., Any]
  validate: Callable[[Any], None]
  eval_sums: Callable[..., dict] | None = None
  report_keys: tuple[str, ...] = ("loss", "perplexity", "accuracy")
  count_unit: str = "tokens"
  config_defaults: Callable[[], Any] | None = None
  extra_evaluation: Callable[..., dict] | None = None
  text_scores: Callable[..., dict] | None = None


def pretraining_model_config(config, vocab_size: int, *, kind: str, **fixed):
  """The ModelConfig of a pretraining run: config.model's preset, overridden by
  its other fields, then by `fixed` (what the objective itself decides).

  vocab_size comes from the trained tokenizer (which may be smaller than
  asked). A model of another kind than the objective trains is refused.
  """
  fields = {k: v for k, v in _as_dict(config.model).items() if v is not None}
  preset = fields.pop("preset", None) or None
  fields.setdefault("kind", kind)
  fields.update(vocab_size=vocab_size, **fixed)
  base = model_config.presets[preset]() if preset else model_config.ModelConfig()
  cfg = model_config.ModelConfig.from_dict({**base.to_dict(), **fields})
  if cfg.kind != kind:
    raise ValueError(f"config.objective={config.objective!r} trains a {kind}, but"
                     f" config.model describes a model of kind {cfg.kind!r}.")
  check_seq_len(config, cfg)
  return cfg


def check_seq_len(config, cfg, model: str = "model") -> None:
  """ValueError when config.data.seq_len is past the model's position table."""
  if config.data.seq_len > cfg.max_len:
    raise ValueError(f"config.data.seq_len ({config.data.seq_len}) exceeds the"
                     f" {model}'s max_len ({cfg.max_len}).")


def _as_dict(section) -> dict:
  return dict(section.to_dict() if hasattr(section, "to_dict") else section)
