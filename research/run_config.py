"""The run configuration: its schema, validation, and the ModelConfig it names.

An experiment (`experiments/*.py`) is an `ml_collections.ConfigDict` nested by
concern. `validate(config)` checks its keys against SCHEMA so a typo in a
config *file* is named (absl's lock_config already names a typo in a
command-line override, but not one in the file itself).

  config.model       ModelConfig fields, plus `preset` (a name in
                     model_config.presets; the other fields override it)
  config.data        corpus, tokenizer, vocab_size, seq_len, mlm options, cache_dir
  config.objective   "causal" | "mlm";  config.nsp  next-sentence prediction
  config.optimizer   research.optimizer's fields
  config.train       steps, batch_size, seed, log_every, eval_every, eval_batches
  config.checkpoint  every, keep, async

A fine-tuning config (`research.finetune`) has objective "classification" and
its own sections where they differ (CLASSIFICATION_SCHEMA):

  config.init_from   the pretrained workdir (or --init-from); config.init_step
                     its checkpoint (0 = the newest)
  config.model       only fields that leave the architecture as pretrained:
                     dropout, dtype, param_dtype, attention, remat
  config.data        task ("stdlib_topics" or a CSV / TSV / JSON Lines file),
                     validation (a file, or "" to hold out validation_fraction
                     of the task), text_field, text_pair_field, label_field,
                     seq_len, cache_dir
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from research import model_config as model_config_lib

_MODEL_KEYS = frozenset(
    f.name for f in dataclasses.fields(model_config_lib.ModelConfig)) | {"preset"}

# Section -> allowed keys (None = a scalar, no sub-keys). `model` keys are all
# optional (the preset supplies the rest); in the other sections every key is
# required, so a config never silently falls back to a default hidden here.
SCHEMA = {
    "model": _MODEL_KEYS,
    "data": frozenset({"corpus", "tokenizer", "vocab_size", "seq_len", "mask_prob",
                       "whole_word_masking", "cache_dir"}),
    "objective": None,
    "nsp": None,
    "optimizer": frozenset({"learning_rate", "schedule", "warmup_steps", "min_lr_ratio",
                            "b1", "b2", "eps", "weight_decay", "grad_clip_norm",
                            "accumulation_steps"}),
    "train": frozenset({"steps", "batch_size", "seed", "log_every", "eval_every",
                        "eval_batches"}),
    "checkpoint": frozenset({"every", "keep", "async"}),
}
OPTIONAL = {"model": _MODEL_KEYS, "data": frozenset({"mask_prob", "whole_word_masking",
                                                     "cache_dir"})}
PRETRAINING_OBJECTIVES = ("causal", "mlm")
OBJECTIVES = PRETRAINING_OBJECTIVES + ("classification",)

# Fine-tuning may change how the pretrained model runs, never its shape.
FINETUNE_MODEL_KEYS = frozenset({"dropout", "dtype", "param_dtype", "attention", "remat"})
CLASSIFICATION_SCHEMA = {
    "init_from": None,
    "init_step": None,
    "model": FINETUNE_MODEL_KEYS,
    "data": frozenset({"task", "validation", "validation_fraction", "text_field",
                       "text_pair_field", "label_field", "seq_len", "cache_dir"}),
    "objective": None,
    "optimizer": SCHEMA["optimizer"],
    "train": SCHEMA["train"],
    "checkpoint": SCHEMA["checkpoint"],
}
CLASSIFICATION_OPTIONAL = {"model": FINETUNE_MODEL_KEYS, "data": frozenset({"cache_dir"})}


def schema_for(config) -> tuple[dict, dict]:
  """(sections, optional keys) of the config's objective."""
  if config.get("objective") == "classification":
    return CLASSIFICATION_SCHEMA, CLASSIFICATION_OPTIONAL
  return SCHEMA, OPTIONAL


def _keys(section) -> set[str]:
  return set(section.keys()) if isinstance(section, (dict, ml_collections.ConfigDict)) else set()


def validate(config) -> None:
  """Raises ValueError naming every unknown or missing key and bad values."""
  problems = []
  schema, optional = schema_for(config)
  unknown_top = sorted(_keys(config) - set(schema))
  if unknown_top:
    problems.append(f"unknown top-level keys {unknown_top}")
  for name, allowed in schema.items():
    if name not in config:
      problems.append(f"missing key config.{name}")
      continue
    if allowed is None:
      continue
    keys = _keys(config[name])
    unknown = sorted(keys - allowed)
    if unknown:
      problems.append(f"unknown keys in config.{name}: "
                      + ", ".join(f"config.{name}.{k}" for k in unknown)
                      + f" (known: {sorted(allowed)})")
    missing = sorted(allowed - keys - optional.get(name, frozenset()))
    if missing:
      problems.append(f"missing keys in config.{name}: {missing}")
  if problems:
    raise ValueError("invalid run config: " + "; ".join(problems) + ".")
  if config.objective not in OBJECTIVES:
    raise ValueError(f"config.objective must be one of {OBJECTIVES}, got {config.objective!r}.")
  if config.objective == "classification":
    _validate_classification(config)
  elif config.nsp and config.objective != "mlm":
    raise ValueError("config.nsp=True needs config.objective='mlm'.")
  preset = config.model.get("preset")
  if preset is not None and preset not in model_config_lib.presets:
    raise ValueError(f"unknown config.model.preset {preset!r}; choose one of"
                     f" {sorted(model_config_lib.presets)}.")
  t = config.train
  for key in ("steps", "batch_size", "log_every", "eval_every"):
    if t[key] < 1:
      raise ValueError(f"config.train.{key} must be >= 1, got {t[key]}.")
  if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
    raise ValueError("config.checkpoint.every and .keep must be >= 1.")


def _validate_classification(config) -> None:
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


def build_model_config(config, vocab_size: int,
                       pretrained: model_config_lib.ModelConfig | None = None,
                       num_labels: int = 0) -> model_config_lib.ModelConfig:
  """The ModelConfig: the preset (if any), overridden by the other model fields.

  vocab_size comes from the trained tokenizer (which may be smaller than asked);
  the encoder's nsp head follows config.nsp. A classification config instead
  starts from the `pretrained` model, sets num_labels and drops the
  pretraining heads (MLM, NSP), as Hugging Face's *ForSequenceClassification
  models do.
  """
  if config.objective == "classification":
    return _classifier_config(config, vocab_size, pretrained, num_labels)
  fields = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
  preset = fields.pop("preset", None)
  fields["vocab_size"] = vocab_size
  if config.objective == "mlm":
    fields.setdefault("kind", "encoder")
    fields["nsp"] = bool(config.nsp)
  base = model_config_lib.presets[preset]() if preset else model_config_lib.ModelConfig()
  merged = {**base.to_dict(), **fields}
  cfg = model_config_lib.ModelConfig.from_dict(merged)
  if (cfg.kind == "decoder") != (config.objective == "causal"):
    raise ValueError(f"config.objective={config.objective!r} does not fit a model of"
                     f" kind {cfg.kind!r} (causal needs a decoder, mlm an encoder).")
  if config.data.seq_len > cfg.max_len:
    raise ValueError(f"config.data.seq_len ({config.data.seq_len}) exceeds the"
                     f" model's max_len ({cfg.max_len}).")
  return cfg


def _classifier_config(config, vocab_size, pretrained, num_labels):
  if pretrained is None:
    raise ValueError("a classification config fine-tunes a pretrained model; none given"
                     " (research.finetune --init-from DIR).")
  if pretrained.vocab_size != vocab_size:
    raise ValueError(f"the tokenizer has {vocab_size} tokens but the pretrained model"
                     f" {pretrained.vocab_size}: the tokenizer is not the pretrained run's.")
  if num_labels < 2:
    raise ValueError(f"classification needs at least 2 labels, the data has {num_labels}.")
  overrides = dict(config.model.to_dict() if hasattr(config.model, "to_dict")
                   else config.model)
  cfg = pretrained.replace(num_labels=num_labels, nsp=False, **overrides)
  if cfg.kind == "encoder":
    cfg = cfg.replace(mlm=False)
  if config.data.seq_len > cfg.max_len:
    raise ValueError(f"config.data.seq_len ({config.data.seq_len}) exceeds the"
                     f" pretrained model's max_len ({cfg.max_len}).")
  return cfg


def to_json(config) -> str:
  """The config as JSON (stored beside the checkpoints)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.dumps(d, indent=2, sort_keys=True, default=str) + "\n"


def diff_model(saved: dict, current: dict) -> list[str]:
  """'field: saved -> current' for every differing ModelConfig field."""
  keys = sorted(set(saved) | set(current))
  return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
          for k in keys if saved.get(k) != current.get(k)]
