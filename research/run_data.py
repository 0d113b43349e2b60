"""From config.data / config.objective to a tokenizer and train/eval batch makers."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

from research import data as data_lib
from research.data.cache import DEFAULT_CACHE_DIR


@dataclasses.dataclass
class RunData:
  tokenizer: data_lib.Tokenizer
  train: object  # CausalLMBatches | MLMBatches over the train split
  eval: object  # the same over the validation split (eval_batches())
  corpus_name: str


def cache_dir(config) -> Path:
  """config.data.cache_dir, or the data layer's default (~/.cache/fusedlm)."""
  value = config.data.get("cache_dir") or ""
  return Path(os.path.expanduser(value)) if value else DEFAULT_CACHE_DIR


def build(config, tokenizer: data_lib.Tokenizer | None = None) -> RunData:
  """Loads the corpus, tokenizer (trained once, cached) and the batch makers.

  `tokenizer` (the one saved in a workdir) is used as is when given, so a
  resumed run tokenizes exactly as the run that wrote the checkpoint.
  """
  d, cache = config.data, cache_dir(config)
  corpus = data_lib.load_corpus(d.corpus, cache_dir=cache)
  if tokenizer is None:
    vocab = None if d.tokenizer == "byte" else d.vocab_size
    tokenizer = data_lib.get_or_train_tokenizer(d.tokenizer, corpus, vocab, cache)
  splits = {s: data_lib.tokenize_split(corpus, s, tokenizer, cache)
            for s in ("train", "validation")}
  common = dict(tokenizer=tokenizer, seq_len=d.seq_len, batch_size=config.train.batch_size,
                seed=config.train.seed, process_index=jax.process_index(),
                process_count=jax.process_count())
  if config.objective == "causal":
    make = lambda split: data_lib.CausalLMBatches(splits[split], **common)
  else:
    options = dict(nsp=bool(config.nsp), mask_prob=d.get("mask_prob", 0.15),
                   whole_word_masking=d.get("whole_word_masking", False))
    make = lambda split: data_lib.MLMBatches(splits[split], **common, **options)
  return RunData(tokenizer, make("train"), make("validation"), corpus.name)
