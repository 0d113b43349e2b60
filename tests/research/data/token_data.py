"""Synthetic token data for batch-maker tests."""

import numpy as np

from fusedlm.research.data.cache import TokenizedSplit


def split_of(lengths, start=5, seed=0) -> TokenizedSplit:
  """An in-memory split of random ids in [start, start + 200) with the given doc lengths."""
  rng = np.random.default_rng(seed)
  return TokenizedSplit.from_documents(
      [rng.integers(start, start + 200, size=n) for n in lengths])


def explicit_stream(split: TokenizedSplit, separator: int):
  """(ids, doc, offset) of the separator-joined stream, built the obvious way."""
  ids, doc, offset = [], [], []
  for index in range(split.num_docs):
    tokens = list(split.document(index)) + [separator]
    ids += tokens
    doc += [index] * len(tokens)
    offset += list(range(len(tokens)))
  return np.array(ids), np.array(doc), np.array(offset)
