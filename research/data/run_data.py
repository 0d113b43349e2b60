"""From config.data to a tokenizer and train/eval batch makers.

The objective records (research.objectives) build their data here, each with
its own batch maker; callers go through the record:

  data = objectives.get(config.objective).train_data(config, tokenizer)
  batches, name = objective.eval_data(saved_config, tokenizer, 16, "other.txt", None)

  build_lm / lm_evaluation_batches       a corpus (config.data.corpus), tokenized;
                                         pretraining objectives
  build_classification /
  classification_evaluation_batches      a labelled task (config.data.task)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

from fusedlm.research import data as data_lib
from fusedlm.research.data import stdlib_topics
from fusedlm.research.data.cache import DEFAULT_CACHE_DIR
from fusedlm.research.data.classification import split_examples


@dataclasses.dataclass
class RunData:
  tokenizer: data_lib.Tokenizer
  train: object  # CausalLMBatches | MLMBatches | ClassificationBatches, train split
  eval: object  # the same over the validation split (eval_batches())
  corpus_name: str  # the corpus, or the labelled task
  label_names: tuple[str, ...] | None = None  # classification: label i's name


def cache_dir(config) -> Path:
  """config.data.cache_dir, or the data layer's default (~/.cache/fusedlm)."""
  value = config.data.get("cache_dir") or ""
  return Path(os.path.expanduser(value)) if value else DEFAULT_CACHE_DIR


def build_lm(config, tokenizer: data_lib.Tokenizer | None, *, make_batches) -> RunData:
  """Loads the corpus, tokenizer (trained once, cached) and the batch makers.

  make_batches(config, tokens, **common) is the objective's batch maker over
  one tokenized split. `tokenizer` (the one saved in a workdir) is used as is
  when given, so a resumed run tokenizes exactly as the run that wrote the
  checkpoint.
  """
  d, cache = config.data, cache_dir(config)
  corpus = data_lib.load_corpus(d.corpus, cache_dir=cache)
  if tokenizer is None:
    vocab = None if d.tokenizer == "byte" else d.vocab_size
    tokenizer = data_lib.get_or_train_tokenizer(d.tokenizer, corpus, vocab, cache)
  make = _lm_split_batches(config, tokenizer, config.train.batch_size, make_batches)
  return RunData(tokenizer, make(corpus, "train"), make(corpus, "validation"), corpus.name)


def _lm_split_batches(config, tokenizer, batch_size: int, make_batches):
  """(corpus, split) -> the objective's batch maker over that split."""
  common = dict(tokenizer=tokenizer, seq_len=config.data.seq_len, batch_size=batch_size,
                seed=config.train.seed, process_index=jax.process_index(),
                process_count=jax.process_count())

  def make(corpus, split):
    tokens = data_lib.tokenize_split(corpus, split, tokenizer, cache_dir(config))
    return make_batches(config, tokens, **common)
  return make


def labelled_task(data_config, label_names=None):
  """(train, validation, name) examples of config.data.task (see run_config).

  `label_names` fixes the label numbering (a saved run's); by default the
  built-in task's own, or the training file's sorted labels.
  """
  d = data_config
  if d.task == stdlib_topics.NAME:
    train, validation = stdlib_topics.stdlib_topics(d.validation_fraction)
    return train, validation, stdlib_topics.NAME
  fields = _label_fields(d)
  train = data_lib.load_labeled_examples(d.task, **fields, label_names=label_names)
  if d.validation:
    validation = data_lib.load_labeled_examples(d.validation, **fields,
                                                label_names=train.label_names)
  else:
    train, validation = split_examples(train, d.validation_fraction, d.task)
  return train, validation, Path(d.task).name


def _label_fields(d) -> dict:
  return dict(text_field=d.text_field, label_field=d.label_field,
              text_pair_field=d.text_pair_field or None)


def _classification_batches(config, examples, tokenizer, batch_size: int):
  return data_lib.ClassificationBatches(
      examples, tokenizer, config.data.seq_len, batch_size, config.train.seed,
      jax.process_index(), jax.process_count())


def build_classification(config, tokenizer) -> RunData:
  """The labelled task's train and validation batches, in the pretrained tokenizer."""
  if tokenizer is None:
    raise ValueError("a classification run keeps its pretrained model's tokenizer;"
                     " none was given (fusedlm finetune --init_from DIR).")
  train, validation, name = labelled_task(config.data)
  size = config.train.batch_size
  return RunData(tokenizer, _classification_batches(config, train, tokenizer, size),
                 _classification_batches(config, validation, tokenizer, size), name,
                 train.label_names)


def classification_evaluation_batches(config, tokenizer, batch_size: int,
                                      data: str | None = None, label_names=None):
  """(batch maker, description): the task's validation split, or a labelled file
  `data` read with the run's field names and label_names."""
  if data is None:
    _, examples, name = labelled_task(config.data, label_names)
    description = f"{name} validation split"
  else:
    examples = data_lib.load_labeled_examples(data, **_label_fields(config.data),
                                              label_names=label_names)
    description = str(data)
  return _classification_batches(config, examples, tokenizer, batch_size), description


def lm_evaluation_batches(config, tokenizer, batch_size: int, data: str | None = None,
                          label_names=None, *, make_batches):
  """(batch maker with eval_batches(), description) for evaluating a language model.

  Without `data`: the run's own validation split. With it: "builtin" or
  "synthetic" (their validation split) or a path, folder, glob or .jsonl of
  text, all of whose documents are evaluated. label_names is unused.
  """
  del label_names
  if data is None or data in ("builtin", "synthetic"):
    corpus = data_lib.load_corpus(config.data.corpus if data is None else data,
                                  cache_dir=cache_dir(config))
    description = f"{corpus.name} validation split"
  else:
    # A user's text is evaluated whole: naming it as its own validation part
    # keeps every document (and no hash split) on the validation side.
    corpus = data_lib.load_corpus(data, cache_dir=cache_dir(config),
                                  validation_patterns=data)
    description = f"{data} (all {len(corpus.validation)} documents)"
  make = _lm_split_batches(config, tokenizer, batch_size, make_batches)
  return make(corpus, "validation"), description
