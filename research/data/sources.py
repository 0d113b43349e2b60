"""Turns a corpus name from a config into a Corpus.

  "builtin"               the built-in standard-library corpus (`stdlib_corpus`)
  "synthetic"             the Markov-chain corpus with its default spec (`synthetic`)
  "*.jsonl" / "*.json"    JSON Lines files, documents from `text_field`
  anything else           plain-text files, folders or globs (`user_corpus`)
"""

from __future__ import annotations

import os
from pathlib import Path

from fusedlm.research.data.corpus import Corpus
from fusedlm.research.data.stdlib_corpus import builtin_corpus
from fusedlm.research.data.synthetic import synthetic_corpus
from fusedlm.research.data.user_corpus import JSONL_SUFFIXES, jsonl_corpus, text_corpus


def load_corpus(source: str | os.PathLike, *, text_field: str = "text",
                validation_fraction: float = 0.05, cache_dir: str | os.PathLike | None = None,
                **options) -> Corpus:
  """The corpus named by `source` (see module docstring).

  `options` go to `text_corpus` / `jsonl_corpus` (e.g. validation_patterns,
  document_separator); `cache_dir` memoizes the built-in corpus's assembly.

  Raises:
    FileNotFoundError: a path or glob that matches no file.
    ValueError: empty corpus or missing text field.
  """
  if source == "builtin":
    return builtin_corpus(validation_fraction, cache_dir)
  if source == "synthetic":
    return synthetic_corpus()[0]
  if Path(source).name.endswith(JSONL_SUFFIXES):
    return jsonl_corpus(source, text_field=text_field,
                        validation_fraction=validation_fraction, **options)
  return text_corpus(source, validation_fraction=validation_fraction, **options)
