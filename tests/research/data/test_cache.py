"""Tokenized splits: stored once as memmaps, reloaded without tokenizing, keyed by content."""

import numpy as np
import pytest

from fusedlm.research.data.cache import TokenizedSplit, entry_path, token_dtype, tokenize_split
from fusedlm.research.data.corpus import Corpus


def test_tokens_and_offsets_match_direct_encoding(english_corpus, wordpiece, tmp_path):
  split = tokenize_split(english_corpus, "train", wordpiece, tmp_path)
  expected = wordpiece.encode_batch(english_corpus.train)
  assert split.num_docs == len(expected)
  np.testing.assert_array_equal(split.doc_lengths, [len(ids) for ids in expected])
  np.testing.assert_array_equal(split.tokens, np.concatenate(expected))
  np.testing.assert_array_equal(split.document(3), expected[3])
  assert split.tokens.dtype == np.uint16 and isinstance(split.tokens, np.memmap)
  assert not split.from_cache and split.tokens_per_second > 0


def test_second_load_does_not_tokenize(english_corpus, bpe, tmp_path, monkeypatch):
  first = tokenize_split(english_corpus, "validation", bpe, tmp_path)
  monkeypatch.setattr(type(bpe), "encode_batch",
                      lambda self, texts: pytest.fail("tokenized again"))
  second = tokenize_split(english_corpus, "validation", bpe, tmp_path)
  assert second.from_cache and second.tokens_per_second is None
  assert second.path == first.path
  np.testing.assert_array_equal(second.tokens, first.tokens)
  np.testing.assert_array_equal(second.doc_offsets, first.doc_offsets)


def test_key_changes_with_corpus_split_and_tokenizer(english_corpus, wordpiece, bpe, tmp_path):
  edited = Corpus(english_corpus.name, english_corpus.train[:-1] + ["changed"],
                  english_corpus.validation)
  paths = {entry_path(tmp_path, english_corpus, "train", wordpiece),
           entry_path(tmp_path, english_corpus, "validation", wordpiece),
           entry_path(tmp_path, english_corpus, "train", bpe),
           entry_path(tmp_path, edited, "train", wordpiece)}
  assert len(paths) == 4


def test_split_without_tokens_is_rejected(byte_level, tmp_path):
  with pytest.raises(ValueError, match="split 'train' of corpus 'hollow' has no tokens"):
    tokenize_split(Corpus("hollow", [""], ["x"]), "train", byte_level, tmp_path)


def test_dtype_grows_with_the_vocabulary():
  assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
  split = TokenizedSplit.from_documents([np.array([70000, 1]), np.array([2])],
                                        vocab_size=70001)
  assert split.tokens.dtype == np.uint32
  np.testing.assert_array_equal(split.doc_offsets, [0, 2, 3])


def test_stale_partials_of_dead_writers_are_removed(tmp_path):
  import os
  import subprocess
  import sys

  from fusedlm.research.data import partials
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  stale = tmp_path / f"entry.{dead}.partial"
  stale.mkdir()
  (stale / "tokens.bin").write_bytes(b"half")
  old = 1_000_000_000
  os.utime(stale / "tokens.bin", (old, old))
  os.utime(stale, (old, old))
  fresh = tmp_path / f"other.{dead}.partial"  # recently written: maybe another host's
  fresh.mkdir()
  mine = tmp_path / f"entry.{os.getpid()}.partial"
  mine.mkdir()
  os.utime(mine, (old, old))
  assert partials.remove_stale(tmp_path) == [stale]
  assert not stale.exists() and fresh.exists() and mine.exists()
