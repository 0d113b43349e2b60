"""The run configuration: every default in one place, validation, the ModelConfig.

An experiment (`experiments/*.py`) starts from `defaults()` (pretraining) or
`finetune_defaults()` (fusedlm finetune; `finetune_defaults("qa")` for
extractive QA) and states only what differs, then
hands the result to `finish(config, arg)`, which applies the `runlocal` smoke
switch when the config file is named as `experiments/X.py:runlocal`:

  def get_config(arg: str = ""):
    config = run_config.defaults()
    config.model.preset = "tiny_gpt"
    config.train.steps = 300
    return run_config.finish(config, arg)

The defaults are also the schema: `validate` names every key an experiment
file added that the defaults do not have (absl's lock_config names a typo in
a command-line override), every missing key and every bad value. The
objective-specific checks and the ModelConfig come from the objective's record
(research.objectives).

  config.model       `preset` (a name in research.models.config.presets) and
                     every ModelConfig field (but vocab_size, nsp, num_labels,
                     which the run sets), None = the preset's value
  config.data        what to read and how to tokenize and batch it
  config.objective   a name in research.objectives.REGISTRY
  config.nsp         next-sentence prediction (objective "mlm")
  config.optimizer   research.training.optimizer's fields
  config.train       steps, batch_size, seed, log_every, eval_every, eval_batches
  config.checkpoint  every, keep, async
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import ml_collections
from ml_collections import config_dict

from fusedlm.research import objectives
from fusedlm.research.models import config as model_config_lib

RUNLOCAL = "runlocal"  # experiments/X.py:runlocal -> a smoke-size run on a CPU
RUNLOCAL_STEPS = 40


def _model_section(fields) -> ml_collections.ConfigDict:
  """ModelConfig fields as typed placeholders (None = the preset's value), so
  every field can be overridden from the command line."""
  section = ml_collections.ConfigDict()
  hints = typing.get_type_hints(model_config_lib.ModelConfig)
  for field in dataclasses.fields(model_config_lib.ModelConfig):
    if field.name in fields:
      kind = hints[field.name]
      kind = next(a for a in typing.get_args(kind) if a is not type(None)) if (
          typing.get_origin(kind) is not None) else kind
      section[field.name] = config_dict.placeholder(kind)
  return section


def _optimizer_section() -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.learning_rate = 3e-4  # peak rate, reached after warm-up
  o.schedule = "cosine"  # decay after warm-up: "cosine" | "linear" | "constant"
  o.warmup_steps = 100  # linear warm-up (capped at train.steps)
  o.min_lr_ratio = 0.1  # final rate / peak
  o.b1 = 0.9  # Adam first moment
  o.b2 = 0.95  # Adam second moment (GPT-style; BERT uses 0.999)
  o.eps = 1e-8  # Adam epsilon
  o.weight_decay = 0.1  # decoupled, weight matrices only
  o.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
  o.accumulation_steps = 1  # micro-batches per optimizer update
  return o


def _train_section() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.steps = 1000  # optimizer updates (x accumulation_steps micro-batches)
  t.batch_size = 32  # global batch (rows), split over the devices
  t.seed = 0  # init, dropout, masking and data order
  t.log_every = 50  # steps per train log row
  t.eval_every = 500  # steps between validation passes (and at the end)
  t.eval_batches = 16  # validation batches per pass (0 = all)
  t.profile_steps = 0  # > 0: a jax.profiler trace of this many steps into DIR/profile
  return t


def _checkpoint_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every = 500  # steps between checkpoints (and one at the end)
  c.keep = 2  # newest checkpoints kept
  c["async"] = True  # save in the background
  return c


# ModelConfig fields the run decides, not config.model: the trained tokenizer's
# size, config.nsp, and the labels of a fine-tuning task.
SET_BY_THE_RUN = frozenset({"vocab_size", "nsp", "num_labels"})


def defaults(objective: str = "causal") -> ml_collections.ConfigDict:
  """Every field of a pretraining config for `objective`, with its default.

  The objective's record may extend these (seq2seq's parallel-text data and
  decoding settings: `Objective.config_defaults`); fine-tuning objectives
  start from `finetune_defaults()` instead.
  """
  record = objectives.get(objective)
  if record.fine_tunes:
    raise ValueError(f"a {objective} config fine-tunes: start it from"
                     f" run_config.finetune_defaults({objective!r}).")
  config = ml_collections.ConfigDict()
  config.model = _model_section({f.name for f in dataclasses.fields(
      model_config_lib.ModelConfig)} - SET_BY_THE_RUN)
  config.model.preset = ""  # research.models.config.presets; "" = ModelConfig's defaults

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "builtin"  # "builtin" | "synthetic" | a path / glob / .jsonl
  config.data.tokenizer = "bpe"  # "bpe" | "wordpiece" | "byte"
  config.data.vocab_size = 8192  # asked size; the model takes the trained size
  config.data.seq_len = 128  # tokens per training row; <= model max_len
  config.data.mask_prob = 0.15  # mlm: fraction of tokens selected (80/10/10)
  config.data.whole_word_masking = False  # mlm: mask whole words, not word pieces
  config.data.cache_dir = ""  # tokenizer + tokenized-split cache; "" = ~/.cache/fusedlm

  config.objective = "causal"  # research.objectives.REGISTRY: "causal" | "mlm"
  config.nsp = False  # next-sentence prediction (mlm only)

  config.optimizer = _optimizer_section()
  config.train = _train_section()
  config.checkpoint = _checkpoint_section()
  config.objective = objective
  if record.config_defaults is not None:
    config = record.config_defaults(config)
  return config


# Fine-tuning may change how the pretrained model runs, never its shape.
FINETUNE_MODEL_KEYS = frozenset({"dropout", "dtype", "param_dtype", "attention", "remat"})


def finetune_defaults(objective: str = "classification") -> ml_collections.ConfigDict:
  """Every field of a fine-tuning config for `objective`, with its default.

  These are classification's; another fine-tuning objective's record extends
  them (qa's SQuAD data and answer decoding: `Objective.config_defaults`).
  """
  record = objectives.get(objective)
  if not record.fine_tunes:
    raise ValueError(f"a {objective} config pretrains: start it from"
                     f" run_config.defaults({objective!r}).")
  config = ml_collections.ConfigDict()
  config.init_from = ""  # the pretrained workdir; fusedlm finetune --init_from sets it
  config.init_step = 0  # its checkpoint step; 0 = the newest

  config.model = _model_section(FINETUNE_MODEL_KEYS)  # None = as pretrained

  config.data = ml_collections.ConfigDict()
  config.data.task = ""  # "stdlib_topics" (built in) or a .csv / .tsv / .jsonl file
  config.data.validation = ""  # held-out file; "" = hold out validation_fraction of the task
  config.data.validation_fraction = 0.1  # by a hash of each text
  config.data.text_field = "text"  # column / field names of a file task
  config.data.text_pair_field = ""  # second text of pair tasks; "" = single texts
  config.data.label_field = "label"
  config.data.seq_len = 128  # tokens per example ([CLS] text [SEP]); <= the model's max_len
  config.data.cache_dir = ""  # unused by classification data (kept for symmetry)

  config.objective = "classification"

  config.optimizer = _optimizer_section()
  config.optimizer.learning_rate = 1e-3  # peak
  config.optimizer.schedule = "linear"  # BERT's fine-tuning schedule
  config.optimizer.warmup_steps = 30  # linear warm-up
  config.optimizer.min_lr_ratio = 0.0  # decay to zero
  config.optimizer.b2 = 0.999  # Adam second moment
  config.optimizer.weight_decay = 0.01  # decoupled, weight matrices only
  config.train = _train_section()
  config.train.steps = 300
  config.train.log_every = 20
  config.train.eval_every = 100
  config.train.eval_batches = 0  # the whole held-out split
  config.checkpoint = _checkpoint_section()
  config.checkpoint.every = 100
  config.checkpoint.keep = 1
  config.objective = objective
  if record.config_defaults is not None:
    config = record.config_defaults(config)
  return config


def runlocal(config: ml_collections.ConfigDict, steps: int = RUNLOCAL_STEPS):
  """Shrinks a run to a CPU smoke size: 64-token rows, 16 rows a batch, `steps`
  updates, two checkpoints, a 4-batch evaluation at the end. A pretraining
  model shrinks to 2 blocks of width 64 (float32, XLA attention) on the
  synthetic corpus with the byte tokenizer (nothing to train); a fine-tuned
  model stays the pretrained one."""
  if not objectives.get(config.objective).fine_tunes:
    config.model.update(num_layers=2, hidden_size=64, num_heads=2, mlp_dim=256,
                        max_len=64, dtype="float32", attention="xla")
    config.data.update(corpus="synthetic", tokenizer="byte", vocab_size=261)
  config.data.seq_len = 64
  config.train.steps = steps
  config.train.batch_size = 16
  config.train.log_every = 10
  config.train.eval_every = steps
  config.train.eval_batches = 4
  config.optimizer.warmup_steps = 5
  config.checkpoint.every = max(1, steps // 2)
  config.checkpoint.keep = 3
  return config


def is_runlocal(arg: str | None) -> bool:
  """The config-file argument: "" or "runlocal"; anything else is named."""
  if arg in (None, ""):
    return False
  if arg == RUNLOCAL:
    return True
  raise ValueError(f"unknown config argument {arg!r}: the experiments take"
                   f" '{RUNLOCAL}' (experiments/X.py:{RUNLOCAL}) or nothing.")


def finish(config: ml_collections.ConfigDict, arg: str | None = "", *, smoke=None):
  """An experiment's last step: with arg "runlocal", `smoke(config)` (the
  experiment's own model/data shrinking, if any) and then `runlocal`."""
  if is_runlocal(arg):
    if smoke is not None:
      smoke(config)
    runlocal(config)
  return config


def _schema_of(config: ml_collections.ConfigDict) -> dict:
  """Section -> allowed keys (None = a scalar) of a defaults() tree."""
  return {name: (frozenset(value.keys()) if isinstance(value, ml_collections.ConfigDict)
                 else None) for name, value in config.items()}


def schema_for(config) -> dict:
  """The schema of the config's objective: its record's own defaults, else
  pretraining's or fine-tuning's."""
  objective = objectives.get(config.get("objective"))
  return _schema_of(finetune_defaults(objective.name) if objective.fine_tunes
                    else defaults(objective.name))


def _keys(section) -> set[str]:
  return set(section.keys()) if isinstance(section, (dict, ml_collections.ConfigDict)) else set()


def validate(config) -> None:
  """Raises ValueError naming every unknown or missing key and bad values."""
  objective = objectives.get(config.get("objective"))
  schema = schema_for(config)
  problems = []
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
    missing = sorted(allowed - keys)
    if missing:
      problems.append(f"missing keys in config.{name}: {missing}")
  if problems:
    raise ValueError("invalid run config: " + "; ".join(problems) + ".")
  objective.validate(config)
  preset = config.model.get("preset")
  if preset and preset not in model_config_lib.presets:
    raise ValueError(f"unknown config.model.preset {preset!r}; choose one of"
                     f" {sorted(model_config_lib.presets)}.")
  for dotted, kind, low, high in _RANGES:
    value = _get(config, dotted)
    if value is not None:
      _check_range(dotted, value, kind, low, high)
  lr = config.optimizer.learning_rate
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
    raise ValueError(f"config.optimizer.learning_rate must be a finite number > 0,"
                     f" got {lr!r} (a negative rate climbs the loss).")


# The numeric fields and their ranges, checked before anything runs (a bad one
# otherwise fails late: a negative eval_batches only at the first evaluation).
# (field, type, lowest, highest); a bound is (value, inclusive) or None.
_RANGES = (
    ("train.steps", int, (1, True), None),
    ("train.batch_size", int, (1, True), None),
    ("train.log_every", int, (1, True), None),
    ("train.eval_every", int, (1, True), None),
    ("train.eval_batches", int, (0, True), None),  # 0 = every batch of the split
    ("train.profile_steps", int, (0, True), None),
    ("train.seed", int, (0, True), None),
    ("checkpoint.every", int, (1, True), None),
    ("checkpoint.keep", int, (1, True), None),
    ("optimizer.warmup_steps", int, (0, True), None),
    ("optimizer.accumulation_steps", int, (1, True), None),
    ("optimizer.min_lr_ratio", float, (0.0, True), (1.0, True)),
    ("optimizer.b1", float, (0.0, True), (1.0, False)),
    ("optimizer.b2", float, (0.0, True), (1.0, False)),
    ("optimizer.eps", float, (0.0, False), None),
    ("optimizer.weight_decay", float, (0.0, True), None),
    ("optimizer.grad_clip_norm", float, (0.0, True), None),  # 0 = off
    ("data.seq_len", int, (2, True), None),
    ("data.vocab_size", int, (1, True), None),
    ("data.mask_prob", float, (0.0, False), (1.0, False)),
    ("data.validation_fraction", float, (0.0, True), (1.0, False)),
)


def _get(config, dotted: str):
  section, _, key = dotted.partition(".")
  holder = config.get(section)
  return holder.get(key) if holder is not None and key in holder else None


def _check_range(dotted: str, value, kind, low, high) -> None:
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not is_number or (kind is int and not float(value).is_integer()) or (
      not math.isfinite(value)):
    raise ValueError(f"config.{dotted} must be {'an integer' if kind is int else 'a number'},"
                     f" got {value!r}.")
  for bound, below in ((low, True), (high, False)):
    if bound is None:
      continue
    limit, inclusive = bound
    ok = (value >= limit if inclusive else value > limit) if below else (
        value <= limit if inclusive else value < limit)
    if not ok:
      sign = (">=" if inclusive else ">") if below else ("<=" if inclusive else "<")
      raise ValueError(f"config.{dotted} must be {sign} {limit}, got {value!r}.")


def build_model_config(config, vocab_size: int,
                       pretrained: model_config_lib.ModelConfig | None = None,
                       num_labels: int = 0) -> model_config_lib.ModelConfig:
  """The ModelConfig the objective builds from config.model (see research.objectives).

  vocab_size comes from the trained tokenizer (which may be smaller than asked);
  a fine-tuning objective starts from the `pretrained` model instead.
  """
  return objectives.get(config.objective).model_config(
      config, vocab_size, pretrained, num_labels)


def to_json(config) -> str:
  """The config as JSON (stored beside the checkpoints)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.dumps(d, indent=2, sort_keys=True, default=str) + "\n"


def diff_model(saved: dict, current: dict) -> list[str]:
  """'field: saved -> current' for every differing ModelConfig field."""
  keys = sorted(set(saved) | set(current))
  return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
          for k in keys if saved.get(k) != current.get(k)]
