"""Tokenized corpus splits, cached on disk as memory-mapped token arrays.

A split is stored as one flat array of token ids (all documents back to back,
no separators) plus document offsets:

  <cache_dir>/<corpus name>-<split>-<tokenizer kind>-<key>/
    tokens.bin        raw uint16 (vocab <= 65536) or uint32 ids, [num_tokens]
    doc_offsets.npy   int64 [num_docs + 1]; document i is tokens[o[i]:o[i+1]]
    meta.json         dtype, sizes, corpus and tokenizer names, tokenization speed

The key hashes the corpus fingerprint, the split and the tokenizer fingerprint,
so a changed corpus or tokenizer gets a new entry and a second run with the same
ones memory-maps the stored array instead of tokenizing again. An entry is
written to a temporary folder and renamed into place, so concurrent runs never
see half an entry.

Tokenization runs on the Hugging Face tokenizer's Rayon thread pool (all cores;
RAYON_NUM_THREADS limits it). It is disabled in processes forked after the
parent used it, so tokenize before forking workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fusedlm.research.data import partials
from fusedlm.research.data.corpus import Corpus
from fusedlm.research.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_CACHE_DIR = Path(os.environ.get("FUSEDLM_CACHE_DIR",
                                        Path.home() / ".cache" / "fusedlm"))
_CHUNK_CHARS = 4_000_000  # Characters per encode call: bounds memory, keeps threads busy.


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
  """One tokenized split.

  Attributes:
    tokens: uint16/uint32 [num_tokens], usually a read-only np.memmap.
    doc_offsets: int64 [num_docs + 1]; document i is tokens[o[i]:o[i+1]].
    path: cache folder, or None for an in-memory split.
    from_cache: True when loaded from disk without tokenizing.
    tokens_per_second: tokenization speed, None when loaded from cache.
  """

  tokens: np.ndarray
  doc_offsets: np.ndarray
  path: Path | None = None
  from_cache: bool = False
  tokens_per_second: float | None = None

  @property
  def num_docs(self) -> int:
    return len(self.doc_offsets) - 1

  @property
  def num_tokens(self) -> int:
    return int(self.doc_offsets[-1])

  @property
  def doc_lengths(self) -> np.ndarray:
    """int64 [num_docs]."""
    return np.diff(self.doc_offsets)

  def document(self, index: int) -> np.ndarray:
    return self.tokens[self.doc_offsets[index]:self.doc_offsets[index + 1]]

  @classmethod
  def from_documents(cls, docs: Sequence[np.ndarray],
                     vocab_size: int = 2**16) -> TokenizedSplit:
    """An in-memory split from per-document id arrays (tests, small data)."""
    lengths = np.array([len(doc) for doc in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = (np.concatenate([np.asarray(doc) for doc in docs]) if docs
              else np.zeros(0)).astype(token_dtype(vocab_size))
    return cls(tokens=tokens, doc_offsets=offsets)


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype that holds every id below vocab_size."""
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def cache_key(corpus: Corpus, split: str, tokenizer: Tokenizer) -> str:
  text = f"{CACHE_FORMAT}|{corpus.fingerprint}|{split}|{tokenizer.fingerprint}"
  return hashlib.sha256(text.encode()).hexdigest()


def entry_path(cache_dir: str | os.PathLike, corpus: Corpus, split: str,
               tokenizer: Tokenizer) -> Path:
  readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{corpus.name}-{split}-{tokenizer.kind}")
  key = cache_key(corpus, split, tokenizer)
  return Path(cache_dir) / "tokenized" / f"{readable}-{key[:20]}"


def tokenize_split(corpus: Corpus, split: str, tokenizer: Tokenizer,
                   cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> TokenizedSplit:
  """The tokenized `split` of `corpus`, from the cache or tokenized and stored.

  Raises:
    ValueError: unknown split, or the split has no tokens at all.
  """
  path = entry_path(cache_dir, corpus, split, tokenizer)
  if (path / "meta.json").exists():
    return load_entry(path)
  docs = corpus.split(split)
  partials.remove_stale(path.parent)
  partial = partials.partial_path(path)
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  dtype = token_dtype(tokenizer.vocab_size)
  start = time.perf_counter()
  lengths = []
  with open(partial / "tokens.bin", "wb") as out:
    for chunk in _chunks(docs, _CHUNK_CHARS):
      for ids in tokenizer.encode_batch(chunk):
        out.write(ids.astype(dtype).tobytes())
        lengths.append(len(ids))
  seconds = time.perf_counter() - start
  num_tokens = int(sum(lengths))
  if num_tokens == 0:
    shutil.rmtree(partial)
    raise ValueError(f"split {split!r} of corpus {corpus.name!r} has no tokens "
                     f"({len(docs)} documents)")
  speed = num_tokens / max(seconds, 1e-9)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  np.save(partial / "doc_offsets.npy", offsets)
  meta = {"format": CACHE_FORMAT, "dtype": dtype.name, "num_tokens": num_tokens,
          "num_docs": len(docs), "corpus": corpus.name, "split": split,
          "tokenizer_kind": tokenizer.kind, "tokenizer_fingerprint": tokenizer.fingerprint,
          "corpus_fingerprint": corpus.fingerprint, "seconds": seconds,
          "tokens_per_second": speed}
  (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
  _publish(partial, path)
  log.info("tokenized %s/%s with %s: %d docs, %d tokens in %.2f s (%.0f tokens/s)",
           corpus.name, split, tokenizer.kind, len(docs), num_tokens, seconds, speed)
  return dataclasses.replace(load_entry(path), from_cache=False, tokens_per_second=speed)


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR
) -> dict[str, TokenizedSplit]:
  """{"train": ..., "validation": ...} via `tokenize_split`."""
  return {split: tokenize_split(corpus, split, tokenizer, cache_dir)
          for split in ("train", "validation")}


def load_entry(path: Path) -> TokenizedSplit:
  """Memory-maps a stored entry (read-only)."""
  meta = json.loads((path / "meta.json").read_text())
  tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r",
                     shape=(meta["num_tokens"],))
  offsets = np.load(path / "doc_offsets.npy")
  return TokenizedSplit(tokens=tokens, doc_offsets=offsets, path=path, from_cache=True)


def _publish(partial: Path, path: Path) -> None:
  try:
    os.rename(partial, path)
  except OSError:
    # Another process published the same entry first; its content is identical.
    shutil.rmtree(partial, ignore_errors=True)
    if not (path / "meta.json").exists():
      raise


def _chunks(docs: Sequence[str], max_chars: int) -> Iterator[list[str]]:
  chunk: list[str] = []
  size = 0
  for doc in docs:
    if chunk and size + len(doc) > max_chars:
      yield chunk
      chunk, size = [], 0
    chunk.append(doc)
    size += len(doc)
  if chunk:
    yield chunk
