"""Causal-LM batches: documents packed into fixed windows with segment ids.

Every document is followed by the end-of-text token (the tokenizer's eos, else its
[SEP]) and the documents are joined into one stream (`packing.SeparatedStream`).
Window k holds stream[k*L : k*L + L + 1] for seq_len L: inputs are its first L
tokens and targets its last L, so consecutive windows share one token and every
stream token is an input exactly once per epoch and every next-token pair is a
target once. Windows are the examples that `order.BatchSchedule` shuffles per epoch;
the incomplete last window is left out of training and padded in evaluation.

Batch arrays, [rows, seq_len] with rows = batch_size // process_count:
  inputs       int32  token ids.
  targets      int32  next token ids.
  segment_ids  int32  1, 2, 3, ... for the documents in the window, in order;
                      0 on padding. Attention should stay within a segment.
  positions    int32  0, 1, 2, ... restarting at each document and at the window
                      start (a document cut by the window restarts at 0 too,
                      so positions stay below seq_len); 0 on padding.
  loss_mask    float32 1 where the target continues the input's document
                      (its end-of-text token included), 0 where the target is
                      the first token of the next document or padding.
  weights      float32 [rows]: 1 for real rows, 0 for eval padding rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fusedlm.research.data.cache import TokenizedSplit
from fusedlm.research.data.order import BatchSchedule
from fusedlm.research.data.packing import SeparatedStream
from fusedlm.research.data.tokenizer import Tokenizer


class CausalLMBatches:
  """Packed next-token-prediction batches; `batch(step)` is a pure function of (seed, step)."""

  def __init__(self, split: TokenizedSplit, tokenizer: Tokenizer, seq_len: int,
               batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    if seq_len < 2:
      raise ValueError(f"seq_len must be at least 2 for next-token prediction, got {seq_len}")
    separator = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    if separator is None:
      raise ValueError(f"{tokenizer.kind} tokenizer has neither an end-of-text nor a [SEP] "
                       "token to separate documents")
    if split.num_tokens == 0:
      raise ValueError("the split has no tokens")
    self.seq_len = seq_len
    self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else separator
    self.stream = SeparatedStream(split, separator)
    # A window needs seq_len + 1 stream tokens; neighbours overlap by one.
    full_windows = (self.stream.length - 1) // seq_len
    all_windows = -(-(self.stream.length - 1) // seq_len)
    self._train = (BatchSchedule(full_windows, batch_size, seed, process_index, process_count)
                   if full_windows else None)
    self._eval = BatchSchedule(all_windows, batch_size, seed, process_index, process_count)
    self.num_windows = full_windows

  @property
  def steps_per_epoch(self) -> int:
    return self._training_schedule().steps_per_epoch

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of training batch `step`."""
    schedule = self._training_schedule()
    windows = schedule.train_examples(step)
    return self._windows(windows, np.ones(len(windows), dtype=np.float32))

  def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every window of the split once, in stream order; the last batch is padded."""
    count = self._eval.num_eval_batches
    for index in range(count if max_batches is None else min(max_batches, count)):
      windows, weights = self._eval.eval_examples(index)
      yield self._windows(windows, weights)

  def _training_schedule(self) -> BatchSchedule:
    if self._train is None:
      raise ValueError(f"the split's {self.stream.length} stream tokens do not fill one "
                       f"window of seq_len {self.seq_len} + 1")
    return self._train

  def _windows(self, windows: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    gathered = self.stream.gather(windows * self.seq_len, self.seq_len + 1)
    ids = np.where(gathered.valid, gathered.ids, self.pad_id)
    doc, offset, valid = gathered.doc, gathered.offset, gathered.valid
    input_doc, target_doc = doc[:, :-1], doc[:, 1:]
    input_valid = valid[:, :-1]
    segment_ids = np.where(input_valid, input_doc - input_doc[:, :1] + 1, 0)
    # The document the window starts in restarts at the window start.
    first_segment = input_doc == input_doc[:, :1]
    positions = offset[:, :-1] - np.where(first_segment, offset[:, :1], 0)
    loss_mask = (input_doc == target_doc) & valid[:, 1:] & (weights[:, None] > 0)
    return {
        "inputs": ids[:, :-1].astype(np.int32),
        "targets": ids[:, 1:].astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": np.where(input_valid, positions, 0).astype(np.int32),
        "loss_mask": loss_mask.astype(np.float32),
        "weights": weights.astype(np.float32),
    }
