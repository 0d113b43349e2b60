"""Extractive-QA examples as model rows: long contexts in overlapping windows.

Each question becomes one or more windows (Devlin et al. 2019, section 4.2,
and BERT's run_squad.py):

  [CLS] question [SEP] context tokens [start, start + room) [SEP] [PAD] ...

with the question cut to max_query_len tokens and room = seq_len -
len(question) - 3. Windows start at 0, doc_stride, 2 doc_stride, ... until one
reaches the context's end, so neighbouring windows overlap by room -
doc_stride tokens and an answer cut by one window's edge lies whole in
another (when it is no longer than the overlap).

Answers are mapped to tokens through the tokenizer's character offsets
(`Tokenizer.encode_with_offsets`): the answer's first token is the first
context token that overlaps its characters, its last the last one. A window
that holds the whole answer labels those positions; one that does not, and
every window of an unanswerable question, label [CLS] (position 0), the
no-answer position. `span_text` maps token positions back to the context's
characters, which is what predictions hold.

Batch arrays, [rows, seq_len] with rows = batch_size // process_count:
  input_ids, token_type_ids  int32   token types: 0 question, 1 context
  padding_mask               bool    True on real tokens
  start_positions            int32   [rows] answer start (0 = [CLS])
  end_positions              int32   [rows] answer end, inclusive
  weights                    float32 [rows] 1 for real rows, 0 for eval padding
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from fusedlm.research.data.order import BatchSchedule
from fusedlm.research.data.squad import QAData
from fusedlm.research.data.tokenizer import Tokenizer

FRAMING = 3  # [CLS], [SEP] after the question, [SEP] after the context


@dataclasses.dataclass(frozen=True)
class Window:
  """One model row of one question.

  Attributes:
    question: index of its question in the QAData.
    input_ids: int32 [n <= seq_len], framed as above.
    context_start: row position of the first context token (= question + 2).
    offsets: int64 [c, 2] context characters of the window's c context tokens
      (leading whitespace of a byte-level token trimmed).
    start, end: the answer's row positions, inclusive; 0, 0 = [CLS] (no answer
      here).
  """

  question: int
  input_ids: np.ndarray
  context_start: int
  offsets: np.ndarray
  start: int
  end: int

  @property
  def context_end(self) -> int:
    """Row position one past the last context token."""
    return self.context_start + len(self.offsets)


def trimmed_offsets(context: str, offsets: np.ndarray) -> np.ndarray:
  """offsets with each token's leading whitespace cut (GPT-2-style byte-level
  tokens carry the space before a word; a token of spaces becomes empty)."""
  out = np.array(offsets, dtype=np.int64).reshape(-1, 2)
  for i, (start, end) in enumerate(out):
    while start < end and context[start].isspace():
      start += 1
    out[i, 0] = start
  return out


def answer_tokens(offsets: np.ndarray, start_char: int, end_char: int
                  ) -> tuple[int, int] | None:
  """(first, last) token overlapping characters [start_char, end_char), or None.

  Empty tokens (whitespace) never start or end an answer.
  """
  real = offsets[:, 1] > offsets[:, 0]
  inside = real & (offsets[:, 0] < end_char) & (offsets[:, 1] > start_char)
  hits = np.flatnonzero(inside)
  if hits.size == 0:
    return None
  return int(hits[0]), int(hits[-1])


def span_text(context: str, offsets: np.ndarray, first: int, last: int) -> str:
  """The context's characters from token `first` through token `last` (context-token
  indices), which is what a prediction of that span says."""
  return context[int(offsets[first, 0]):int(offsets[last, 1])]


def make_windows(data: QAData, tokenizer: Tokenizer, seq_len: int, doc_stride: int,
                 max_query_len: int) -> list[Window]:
  """Every question's windows, in question order.

  Raises:
    ValueError: a tokenizer without [CLS]/[SEP], no room for context tokens
      (seq_len too small for max_query_len), or doc_stride outside
      [1, the room left for the context].
  """
  if tokenizer.cls_id is None or tokenizer.sep_id is None:
    raise ValueError(f"the {tokenizer.kind} tokenizer has no [CLS]/[SEP]: extractive QA"
                     " frames [CLS] question [SEP] context [SEP] for a BERT-style encoder.")
  room = seq_len - max_query_len - FRAMING
  if room < 1:
    raise ValueError(f"seq_len {seq_len} leaves no room for the context after a"
                     f" {max_query_len}-token question and {FRAMING} framing tokens;"
                     " raise seq_len or lower max_query_len.")
  if not 1 <= doc_stride <= room:
    raise ValueError(f"doc_stride must be in [1, {room}] (the context tokens a window"
                     f" holds with a {max_query_len}-token question), got {doc_stride};"
                     " a larger stride would skip context tokens.")
  contexts = list(dict.fromkeys(q.context for q in data.questions))
  encoded = dict(zip(contexts, tokenizer.encode_with_offsets(contexts)))
  questions = tokenizer.encode_batch([q.question for q in data.questions])
  windows = []
  for index, (q, q_ids) in enumerate(zip(data.questions, questions)):
    q_ids = q_ids[:max_query_len]
    ids, offsets = encoded[q.context]
    offsets = trimmed_offsets(q.context, offsets)
    answer = None
    if q.answerable:
      text, start_char = q.answers[0]
      answer = answer_tokens(offsets, start_char, start_char + len(text))
    head = np.concatenate([[tokenizer.cls_id], q_ids, [tokenizer.sep_id]]).astype(np.int32)
    fits = seq_len - len(head) - 1
    first = 0
    while True:
      last = min(first + fits, len(ids))  # one past this window's last context token
      row = np.concatenate([head, ids[first:last], [tokenizer.sep_id]]).astype(np.int32)
      start = end = 0
      if answer is not None and first <= answer[0] and answer[1] < last:
        start, end = answer[0] - first + len(head), answer[1] - first + len(head)
      windows.append(Window(index, row, len(head), offsets[first:last], start, end))
      if last >= len(ids):
        break
      first += doc_stride
  return windows


class SpanBatches:
  """Batches of windows; `batch(step)` is a pure function of (seed, step).

  Attributes:
    data: the questions; windows: their windows, in question order.
  """

  def __init__(self, data: QAData, tokenizer: Tokenizer, seq_len: int, doc_stride: int,
               max_query_len: int, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    self.data = data
    self.seq_len = seq_len
    self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    self.windows = make_windows(data, tokenizer, seq_len, doc_stride, max_query_len)
    self._schedule = BatchSchedule(len(self.windows), batch_size, seed, process_index,
                                   process_count)

  def __len__(self) -> int:
    return len(self.windows)

  @property
  def batch_size(self) -> int:
    """Rows of a global batch."""
    return self._schedule.batch_size

  @property
  def steps_per_epoch(self) -> int:
    return self._schedule.steps_per_epoch

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of training batch `step`."""
    rows = self._schedule.train_examples(step)
    return self.rows(rows, np.ones(len(rows), np.float32))

  def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every window once, in order; the last batch is padded with rows of weight 0."""
    count = self._schedule.num_eval_batches
    for index in range(count if max_batches is None else min(max_batches, count)):
      yield self.rows(*self._schedule.eval_examples(index))

  def rows(self, windows: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The batch arrays of the windows at these indices."""
    n = len(windows)
    out = {"input_ids": np.full((n, self.seq_len), self.pad_id, np.int32),
           "token_type_ids": np.zeros((n, self.seq_len), np.int32),
           "padding_mask": np.zeros((n, self.seq_len), bool),
           "start_positions": np.zeros((n,), np.int32),
           "end_positions": np.zeros((n,), np.int32),
           "weights": np.asarray(weights, np.float32)}
    for r, index in enumerate(windows):
      w = self.windows[index]
      length = len(w.input_ids)
      out["input_ids"][r, :length] = w.input_ids
      out["token_type_ids"][r, w.context_start:length] = 1
      out["padding_mask"][r, :length] = True
      out["start_positions"][r], out["end_positions"][r] = w.start, w.end
    return out


def describe(batches: SpanBatches, what: str) -> str:
  """'<what> (N questions, M windows[, K unanswerable])'."""
  questions = batches.data.questions
  unanswerable = sum(not q.answerable for q in questions)
  tail = f", {unanswerable} unanswerable" if unanswerable else ""
  return f"{what} ({len(questions)} questions in {len(batches)} windows{tail})"
