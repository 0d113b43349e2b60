"""Masked-LM (+ next-sentence prediction) batches, BERT-style.

With `nsp=True` the examples are chunks of seq_len - 3 tokens cut from each
document (chunks never span documents; a final chunk shorter than 2 tokens is
dropped). Example = [CLS] A [SEP] B [SEP]: the chunk is split at a random point,
preferring points where B starts a word; A is the head, and B is the rest of the
chunk (nsp_labels 0) or, with probability 1/2, an equally long span at a random
offset of a uniformly drawn *other* document (nsp_labels 1, as in Hugging Face
BERT). Token types: 0 for [CLS] A [SEP], 1 for B [SEP].

With `nsp=False` the documents are joined with [SEP] into one stream
(`packing.SeparatedStream`) and cut into windows of seq_len - 2 tokens: example =
[CLS] window [SEP] (no second [SEP] when the window already ends with one), so
short documents share a row instead of padding it. Token types are all 0.

Tokens are then masked by `masking.mask_sequence`. Randomness of an example comes
from a Generator seeded with (seed, stream, epoch, example) in training and
(seed, stream, example) in evaluation, so batches are pure functions of the step
and do not depend on the number of processes.

Batch arrays, [rows, seq_len] with rows = batch_size // process_count:
  input_ids       int32   corrupted ids.
  token_type_ids  int32   segment A = 0, segment B = 1; 0 on padding.
  padding_mask    bool    True on real tokens.
  mlm_labels      int32   original id at selected positions, 0 elsewhere.
  mlm_weights     float32 1.0 at selected positions.
  mlm_positions   int32   [rows, max_predictions]: the selected positions in
                  order, then seq_len (an empty slot). The MLM head runs at
                  these only (research.models.encoder), as the original BERT's
                  masked_lm_positions; max_predictions bounds the selection
                  budget, so no selected position is ever left out.
  nsp_labels      int32   [rows], 0 = B follows A, 1 = B random (only with nsp).
  weights         float32 [rows], 1 for real rows, 0 for eval padding rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fusedlm.research.data import masking
from fusedlm.research.data.cache import TokenizedSplit
from fusedlm.research.data.order import EVAL_STREAM, EXAMPLE_STREAM, BatchSchedule, example_rng
from fusedlm.research.data.packing import SeparatedStream
from fusedlm.research.data.tokenizer import Tokenizer


class MLMBatches:
  """BERT pretraining batches; `batch(step)` is a pure function of (seed, step)."""

  def __init__(self, split: TokenizedSplit, tokenizer: Tokenizer, seq_len: int,
               batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
               *, nsp: bool = True, mask_prob: float = 0.15, whole_word_masking: bool = False):
    missing = [role for role in ("cls", "sep", "mask")
               if getattr(tokenizer, f"{role}_id") is None]
    if missing:
      raise ValueError(f"MLM needs [CLS], [SEP] and [MASK] tokens; the {tokenizer.kind} "
                       f"tokenizer has no {', '.join(missing)} token")
    specials, texts = (3, 2) if nsp else (2, 1)
    if seq_len < specials + texts:
      raise ValueError(f"seq_len {seq_len} is too short for MLM "
                       f"{'with' if nsp else 'without'} NSP: it needs {specials} special "
                       f"tokens plus {texts} text token(s)")
    if not 0.0 < mask_prob < 1.0:
      raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    if split.num_tokens == 0:
      raise ValueError("the split has no tokens")
    self.split = split
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.seed = seed
    self.nsp = nsp
    self.mask_prob = mask_prob
    self.whole_word_masking = whole_word_masking
    self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    # masking.select_positions takes floor(n * mask_prob + u) <= floor(n *
    # mask_prob) + 1 of n <= seq_len - specials maskable positions (whole words:
    # no more), so this many slots hold every selection, float rounding included.
    self.max_predictions = int(np.floor((seq_len - specials) * mask_prob)) + 1
    self._special = np.zeros(tokenizer.vocab_size, dtype=bool)
    self._special[list(tokenizer.special_ids)] = True
    if nsp:
      self._init_chunks()
      num_examples = len(self._chunk_doc)
    else:
      self._stream = SeparatedStream(split, tokenizer.sep_id)
      num_examples = -(-self._stream.length // (seq_len - 2))
    self._schedule = BatchSchedule(num_examples, batch_size, seed, process_index,
                                   process_count)

  @property
  def steps_per_epoch(self) -> int:
    return self._schedule.steps_per_epoch

  @property
  def num_examples(self) -> int:
    return self._schedule.num_examples

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of training batch `step`."""
    epoch = self._schedule.epoch_of(step)
    examples = self._schedule.train_examples(step)
    rngs = [example_rng(self.seed, EXAMPLE_STREAM, epoch, int(e)) for e in examples]
    return self._rows(examples, rngs, np.ones(len(examples), dtype=np.float32))

  def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, with fixed masks; the last batch is padded."""
    count = self._schedule.num_eval_batches
    for index in range(count if max_batches is None else min(max_batches, count)):
      examples, weights = self._schedule.eval_examples(index)
      rngs = [example_rng(self.seed, EVAL_STREAM, int(e)) for e in examples]
      yield self._rows(examples, rngs, weights)

  def _init_chunks(self) -> None:
    """Cuts every document into chunks of at most seq_len - 3 tokens."""
    size = self.seq_len - 3
    lengths = self.split.doc_lengths
    counts = -(-lengths // size)
    doc = np.repeat(np.arange(len(lengths)), counts)
    index_in_doc = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)
    start = index_in_doc * size
    length = np.minimum(size, lengths[doc] - start)
    keep = length >= 2  # A and B need a token each.
    self._chunk_doc = doc[keep]
    self._chunk_start = (self.split.doc_offsets[doc] + start)[keep]
    self._chunk_len = length[keep]
    # Documents a random B can come from.
    self._nonempty_docs = np.flatnonzero(lengths > 0)
    if len(self._nonempty_docs) < 2:
      raise ValueError(f"NSP needs at least two non-empty documents; the split has "
                       f"{len(self._nonempty_docs)}")
    if not len(self._chunk_doc):
      raise ValueError("no document has the 2 tokens an NSP example needs")

  def _rows(self, examples: np.ndarray, rngs: list[np.random.Generator],
            weights: np.ndarray) -> dict[str, np.ndarray]:
    rows = len(examples)
    batch = {
        "input_ids": np.full((rows, self.seq_len), self.pad_id, dtype=np.int32),
        "token_type_ids": np.zeros((rows, self.seq_len), dtype=np.int32),
        "padding_mask": np.zeros((rows, self.seq_len), dtype=bool),
        "mlm_labels": np.zeros((rows, self.seq_len), dtype=np.int32),
        "mlm_weights": np.zeros((rows, self.seq_len), dtype=np.float32),
        "mlm_positions": np.full((rows, self.max_predictions), self.seq_len, dtype=np.int32),
    }
    nsp_labels = np.zeros(rows, dtype=np.int32)
    for row, (example, rng) in enumerate(zip(examples, rngs)):
      if self.nsp:
        ids, types, nsp_labels[row] = self._nsp_example(int(example), rng)
      else:
        ids = self._packed_example(int(example))
        types = np.zeros(len(ids), dtype=np.int32)
      masked = masking.mask_sequence(
          ids, ~self._special[ids], rng, mask_prob=self.mask_prob,
          mask_id=self.tokenizer.mask_id, replacement_ids=self.tokenizer.regular_ids,
          word_ids=self._word_ids(ids) if self.whole_word_masking else None)
      n = len(ids)
      batch["input_ids"][row, :n] = masked.input_ids
      batch["token_type_ids"][row, :n] = types
      batch["padding_mask"][row, :n] = True
      batch["mlm_labels"][row, :n] = masked.labels
      batch["mlm_weights"][row, :n] = masked.weights * weights[row]
      selected = np.flatnonzero(masked.weights)
      batch["mlm_positions"][row, :len(selected)] = selected
    if self.nsp:
      batch["nsp_labels"] = nsp_labels
    batch["weights"] = weights.astype(np.float32)
    return batch

  def _nsp_example(self, chunk: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """([CLS] A [SEP] B [SEP] ids, token types, nsp label) for one chunk."""
    start, length = self._chunk_start[chunk], self._chunk_len[chunk]
    tokens = np.asarray(self.split.tokens[start:start + length], dtype=np.int32)
    # Split points 1..length-1; prefer those where B begins a word.
    points = np.arange(1, length)
    at_word = points[self.tokenizer.word_start_table[tokens[1:]]]
    a_len = int(rng.choice(at_word if len(at_word) else points))
    is_random = rng.random() < 0.5
    if is_random:
      b_tokens = self._random_span(self._chunk_doc[chunk], length - a_len, rng)
    else:
      b_tokens = tokens[a_len:]
    cls, sep = self.tokenizer.cls_id, self.tokenizer.sep_id
    ids = np.concatenate([[cls], tokens[:a_len], [sep], b_tokens, [sep]]).astype(np.int32)
    types = np.zeros(len(ids), dtype=np.int32)
    types[a_len + 2:] = 1
    return ids, types, int(is_random)

  def _random_span(self, exclude_doc: int, length: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Up to `length` tokens at a random offset of a uniformly drawn other document."""
    docs = self._nonempty_docs
    # Draw among the other documents without rejection: skip over exclude_doc.
    pick = int(rng.integers(len(docs) - 1))
    excluded_at = int(np.searchsorted(docs, exclude_doc))
    doc = docs[pick + (pick >= excluded_at)]
    tokens = self.split.document(doc)
    offset = int(rng.integers(max(len(tokens) - length, 0) + 1))
    return np.asarray(tokens[offset:offset + length], dtype=np.int32)

  def _packed_example(self, window: int) -> np.ndarray:
    """[CLS] window [SEP] ids for one window of the [SEP]-joined stream."""
    width = self.seq_len - 2
    gathered = self._stream.gather(np.array([window * width]), width)
    content = gathered.ids[0][gathered.valid[0]]
    sep = self.tokenizer.sep_id
    tail = [] if len(content) and content[-1] == sep else [sep]
    return np.concatenate([[self.tokenizer.cls_id], content, tail]).astype(np.int32)

  def _word_ids(self, ids: np.ndarray) -> np.ndarray:
    """Word index per position; a segment's first token always starts a word."""
    starts = self.tokenizer.word_start_table[ids].copy()
    starts[1:] |= self._special[ids[:-1]]
    return masking.word_ids_from_starts(starts)
