"""Sequence-classification data: (text, label) files and their batches.

Files are CSV (.csv), TSV (.tsv) or JSON Lines (.jsonl, .json, .ndjson), with
configurable text, optional second-text and label fields. Labels are kept as
strings and numbered by `label_names` (sorted, numerically when all labels are
integers, unless given), so that validation data reuses the training mapping.

Sequences are [CLS] A [SEP] (B [SEP]) for tokenizers with [CLS]/[SEP]; GPT-style
tokenizers without them get A <eos> (B <eos>). Texts too long for seq_len are
cut longest-first, as Hugging Face does.

Batch arrays, [rows, seq_len] with rows = batch_size // process_count:
  input_ids       int32
  token_type_ids  int32   0 for the first text (and its framing), 1 for the second.
  padding_mask    bool    True on real tokens.
  labels          int32   [rows]
  weights         float32 [rows], 1 for real rows, 0 for eval padding rows.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fusedlm.research.data.corpus import document_hash
from fusedlm.research.data.order import BatchSchedule
from fusedlm.research.data.tokenizer import Tokenizer

_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclasses.dataclass(frozen=True)
class LabeledExamples:
  """Texts with integer labels.

  Attributes:
    texts: first text of each example.
    labels: int32 [num_examples], indices into label_names.
    label_names: label strings; label i is label_names[i].
    text_pairs: second text of each example, or None for single texts.
  """

  texts: list[str]
  labels: np.ndarray
  label_names: tuple[str, ...]
  text_pairs: list[str] | None = None

  @property
  def label_to_id(self) -> dict[str, int]:
    return {name: index for index, name in enumerate(self.label_names)}

  def __len__(self) -> int:
    return len(self.texts)


def load_labeled_examples(path: str | os.PathLike, *, text_field: str = "text",
                          label_field: str = "label", text_pair_field: str | None = None,
                          label_names: Sequence[str] | None = None) -> LabeledExamples:
  """Reads (text, [text pair,] label) records from a CSV, TSV or JSON Lines file.

  Args:
    path: the file; its suffix picks the format.
    text_field, label_field, text_pair_field: column / field names.
    label_names: the label vocabulary (e.g. from the training file); inferred
      from this file when None.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unknown format, no records, a missing field, or a label outside
      `label_names`; messages name the file, line and offending value.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no labelled data file at {path}")
  fields = [text_field, label_field] + ([text_pair_field] if text_pair_field else [])
  records = list(_read_records(path))
  if not records:
    raise ValueError(f"{path} holds no records")
  for line, record in records:
    missing = [field for field in fields if record.get(field) is None]
    if missing:
      raise ValueError(f"{path}:{line}: missing field {missing[0]!r}; "
                       f"fields present: {sorted(record)}")
  raw_labels = [str(record[label_field]) for _, record in records]
  names = tuple(label_names) if label_names is not None else infer_label_names(raw_labels)
  index = {name: i for i, name in enumerate(names)}
  for (line, _), label in zip(records, raw_labels):
    if label not in index:
      raise ValueError(f"{path}:{line}: label {label!r} is not one of {list(names)}")
  return LabeledExamples(
      texts=[str(record[text_field]) for _, record in records],
      labels=np.array([index[label] for label in raw_labels], dtype=np.int32),
      label_names=names,
      text_pairs=[str(record[text_pair_field]) for _, record in records] if text_pair_field
      else None)


def split_examples(examples: LabeledExamples, validation_fraction: float,
                   source: str = "") -> tuple[LabeledExamples, LabeledExamples]:
  """(train, validation) by a hash of each example's text, as corpora are split.

  An example goes to validation when the hash of its text (and text pair) falls
  in the lowest `validation_fraction` of the 64-bit range, so the split does
  not depend on the order of the file, and repeated texts land on one side.

  Raises:
    ValueError: a fraction outside (0, 1), or a part that comes out empty.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  threshold = int(validation_fraction * 2**64)
  pairs = examples.text_pairs or [""] * len(examples)
  held_out = np.array([document_hash(f"{a}\x00{b}") < threshold
                       for a, b in zip(examples.texts, pairs)], dtype=bool)
  if held_out.all() or not held_out.any():
    where = f" of {source}" if source else ""
    raise ValueError(
        f"holding out {validation_fraction:.0%} of the {len(examples)} examples{where}"
        f" leaves an empty {'train' if held_out.all() else 'validation'} part; give a"
        " validation file or more examples.")
  return _subset(examples, ~held_out), _subset(examples, held_out)


def _subset(examples: LabeledExamples, keep: np.ndarray) -> LabeledExamples:
  index = np.flatnonzero(keep)
  return LabeledExamples(
      texts=[examples.texts[i] for i in index], labels=examples.labels[index],
      label_names=examples.label_names,
      text_pairs=None if examples.text_pairs is None
      else [examples.text_pairs[i] for i in index])


def infer_label_names(labels: Sequence[str]) -> tuple[str, ...]:
  """Distinct labels sorted numerically if all are integers, else as strings."""
  distinct = set(labels)
  if all(_is_int(label) for label in distinct):
    return tuple(sorted(distinct, key=int))
  return tuple(sorted(distinct))


def _is_int(text: str) -> bool:
  try:
    int(text)
  except ValueError:
    return False
  return True


def _read_records(path: Path) -> Iterator[tuple[int, dict]]:
  """(line number, record) pairs; line numbers count the CSV header as line 1."""
  suffix = path.suffix.lower()
  if suffix in _DELIMITERS:
    with open(path, newline="", encoding="utf-8") as file:
      reader = csv.DictReader(file, delimiter=_DELIMITERS[suffix])
      for record in reader:
        yield reader.line_num, record
  elif suffix in _JSONL_SUFFIXES:
    with open(path, encoding="utf-8") as file:
      for line_number, line in enumerate(file, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
          raise ValueError(f"{path}:{line_number}: expected a JSON object")
        yield line_number, record
  else:
    raise ValueError(f"cannot read labelled data from {path}: expected .csv, .tsv or "
                     f"one of {_JSONL_SUFFIXES}")


def truncate_longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Lengths kept of two texts so they fit `budget`, trimming the longer first."""
  if len_a + len_b <= budget:
    return len_a, len_b
  shorter = min(len_a, len_b)
  if shorter <= budget // 2:
    kept_short, kept_long = shorter, budget - shorter
  else:
    kept_short, kept_long = budget // 2, budget - budget // 2
  return (kept_long, kept_short) if len_a >= len_b else (kept_short, kept_long)


class ClassificationBatches:
  """Batches of labelled sequences; `batch(step)` is a pure function of (seed, step)."""

  def __init__(self, examples: LabeledExamples, tokenizer: Tokenizer, seq_len: int,
               batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    if tokenizer.cls_id is not None and tokenizer.sep_id is not None:
      self._prefix, self._separator = [tokenizer.cls_id], tokenizer.sep_id
    elif tokenizer.eos_id is not None:
      self._prefix, self._separator = [], tokenizer.eos_id
    else:
      raise ValueError(f"the {tokenizer.kind} tokenizer has neither [CLS]/[SEP] nor an "
                       "end-of-text token to frame a sequence")
    pairs = examples.text_pairs is not None
    self._specials = len(self._prefix) + (2 if pairs else 1)
    if seq_len < self._specials + (2 if pairs else 1):
      raise ValueError(f"seq_len {seq_len} is too short: {self._specials} special tokens "
                       f"plus one token per text need {self._specials + (2 if pairs else 1)}")
    self.examples = examples
    self.seq_len = seq_len
    self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    self._a = tokenizer.encode_batch(examples.texts)
    self._b = tokenizer.encode_batch(examples.text_pairs) if pairs else None
    self._schedule = BatchSchedule(len(examples), batch_size, seed, process_index,
                                   process_count)

  @property
  def num_labels(self) -> int:
    return len(self.examples.label_names)

  @property
  def steps_per_epoch(self) -> int:
    return self._schedule.steps_per_epoch

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of training batch `step`."""
    examples = self._schedule.train_examples(step)
    return self._rows(examples, np.ones(len(examples), dtype=np.float32))

  def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in file order; the last batch is padded."""
    count = self._schedule.num_eval_batches
    for index in range(count if max_batches is None else min(max_batches, count)):
      yield self._rows(*self._schedule.eval_examples(index))

  def _rows(self, examples: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    rows = len(examples)
    input_ids = np.full((rows, self.seq_len), self.pad_id, dtype=np.int32)
    token_types = np.zeros((rows, self.seq_len), dtype=np.int32)
    padding_mask = np.zeros((rows, self.seq_len), dtype=bool)
    budget = self.seq_len - self._specials
    for row, example in enumerate(examples):
      a = self._a[example]
      b = self._b[example] if self._b is not None else np.zeros(0, dtype=np.int32)
      keep_a, keep_b = truncate_longest_first(len(a), len(b), budget)
      first = [*self._prefix, *a[:keep_a], self._separator]
      second = [*b[:keep_b], self._separator] if self._b is not None else []
      ids = np.array(first + second, dtype=np.int32)
      input_ids[row, :len(ids)] = ids
      token_types[row, len(first):len(ids)] = 1
      padding_mask[row, :len(ids)] = True
    return {
        "input_ids": input_ids,
        "token_type_ids": token_types,
        "padding_mask": padding_mask,
        "labels": self.examples.labels[examples].astype(np.int32),
        "weights": weights.astype(np.float32),
    }
