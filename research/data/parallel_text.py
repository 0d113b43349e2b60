"""Parallel text for sequence-to-sequence training: (source, target) pairs and batches.

Pairs come from one file with a source and a target field (CSV, TSV or JSON
Lines; a headerless TSV/CSV names its columns "0", "1", ...) or from two
line-aligned text files. TSV is split on tabs alone (no quoting: Tatoeba-style
sentences hold quotation marks). Every pair keeps its origin ("file:line") for
error messages; a missing field or an empty side is refused with it.

Batch arrays (`Seq2SeqBatches`), [rows, seq_len] with rows = batch_size //
process_count. The source gets an end token; the target is shifted right
behind a start token (teacher forcing):

  source_ids           int32    source + [end], padded with pad
  source_padding_mask  bool     True on real source tokens
  target_inputs        int32    [start] + target
  targets              int32    target + [end]: what each position predicts
  loss_mask            float32  1 on real target positions
  weights              float32  [rows]: 1 for real rows, 0 for eval padding rows
  label_smoothing      float32  [rows]: the run's label smoothing on training
                                rows, 0 on evaluation rows (evaluation reports
                                the plain cross-entropy)
packed rows (several pairs per row) add, with pair k of a row numbered k >= 1
and 0 on padding:
  source_positions, target_positions     int32  restart at 0 for each pair
  source_segment_ids, target_segment_ids int32
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fusedlm.research.data.corpus import Corpus, document_hash
from fusedlm.research.data.order import BatchSchedule
from fusedlm.research.data.tokenizer import Tokenizer

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TOO_LONG = ("error", "skip")
PACKING_STREAM = 3  # beside research.data.order's streams: the packing order's draws


@dataclasses.dataclass(frozen=True)
class ParallelText:
  """Aligned source and target sentences, with where each pair came from."""

  sources: list[str]
  targets: list[str]
  origins: list[str]  # "file:line" of each pair
  name: str = ""

  def __len__(self) -> int:
    return len(self.sources)

  def subset(self, index) -> "ParallelText":
    return ParallelText([self.sources[i] for i in index], [self.targets[i] for i in index],
                        [self.origins[i] for i in index], self.name)

  def as_corpus(self, validation: "ParallelText") -> Corpus:
    """Both sides of both parts as a Corpus: one tokenizer learns both languages."""
    return Corpus(self.name, self.sources + self.targets,
                  validation.sources + validation.targets,
                  f"parallel text {self.name}")


def load_parallel_text(path, *, target_path=None, source_field: str = "source",
                       target_field: str = "target", header: bool = True) -> ParallelText:
  """Reads pairs from one file with two fields, or two line-aligned files.

  Args:
    path: a .csv / .tsv / .jsonl file of pairs, or, with target_path, the
      source side, one sentence a line.
    target_path: the target side, line-aligned with `path`.
    source_field, target_field: field names (JSON keys, header names, or
      column numbers "0", "1", ... when header is False).
    header: the CSV / TSV's first line names its columns.

  Raises:
    FileNotFoundError: a missing file.
    ValueError: an unknown format, no pairs, a missing field, an empty side,
      or two files of different lengths; each names the file and line.
  """
  path = Path(path)
  for p in (path, target_path):
    if p is not None and not Path(p).is_file():
      raise FileNotFoundError(f"no parallel text file at {p}")
  if target_path is not None:
    records = _aligned_lines(path, Path(target_path))
    source_field, target_field = "source", "target"
  else:
    records = _records(path, header)
  sources, targets, origins = [], [], []
  for origin, record in records:
    for field in (source_field, target_field):
      if record.get(field) is None:
        raise ValueError(f"{origin}: missing field {field!r}; fields present:"
                         f" {sorted(record)}")
    source, target = str(record[source_field]).strip(), str(record[target_field]).strip()
    for side, field, text in (("source", source_field, source),
                              ("target", target_field, target)):
      if not text:
        raise ValueError(f"{origin}: the {side} side (field {field!r}) is empty; every"
                         " pair needs both sides.")
    sources.append(source)
    targets.append(target)
    origins.append(origin)
  if not sources:
    raise ValueError(f"{path} holds no pairs")
  return ParallelText(sources, targets, origins, path.name)


def _aligned_lines(source: Path, target: Path) -> list[tuple[str, dict]]:
  a = source.read_text(encoding="utf-8").splitlines()
  b = target.read_text(encoding="utf-8").splitlines()
  if len(a) != len(b):
    raise ValueError(f"{source} has {len(a)} lines but {target} has {len(b)}; line-aligned"
                     " parallel files need one target line per source line.")
  return [(f"{source}:{i}", {"source": x, "target": y}) for i, (x, y) in enumerate(zip(a, b), 1)]


def _records(path: Path, header: bool) -> Iterator[tuple[str, dict]]:
  suffix = path.suffix.lower()
  if suffix in _JSONL_SUFFIXES:
    with open(path, encoding="utf-8") as file:
      for number, line in enumerate(file, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
          raise ValueError(f"{path}:{number}: expected a JSON object")
        yield f"{path}:{number}", record
    return
  if suffix not in (".csv", ".tsv"):
    raise ValueError(f"cannot read parallel text from {path}: expected .csv, .tsv, one of"
                     f" {_JSONL_SUFFIXES}, or two line-aligned text files (target_file)")
  with open(path, newline="", encoding="utf-8") as file:
    if suffix == ".tsv":
      reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
      reader = csv.reader(file)
    names = None
    for row in reader:
      if not row:
        continue
      if header and names is None:
        names = row
        continue
      keys = names if header else [str(i) for i in range(len(row))]
      yield f"{path}:{reader.line_num}", dict(zip(keys, row))


def split_pairs(pairs: ParallelText, validation_fraction: float
                ) -> tuple[ParallelText, ParallelText]:
  """(train, validation) by a hash of each source sentence.

  Hashing the source keeps every translation of one sentence on one side (a
  corpus such as Tatoeba has several), so no source is seen in training and
  then scored in validation.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  threshold = int(validation_fraction * 2**64)
  held_out = np.array([document_hash(s) < threshold for s in pairs.sources], dtype=bool)
  if held_out.all() or not held_out.any():
    raise ValueError(
        f"holding out {validation_fraction:.0%} of the {len(pairs)} pairs of {pairs.name}"
        f" leaves an empty {'train' if held_out.all() else 'validation'} part; give a"
        " validation file or more pairs.")
  return pairs.subset(np.flatnonzero(~held_out)), pairs.subset(np.flatnonzero(held_out))


@dataclasses.dataclass(frozen=True)
class Specials:
  """The ids that frame a pair: the target's start, every side's end, padding."""

  start: int
  end: int
  pad: int

  @classmethod
  def of(cls, tokenizer: Tokenizer) -> "Specials":
    """End-of-text starts and ends every target (as fairseq and BART do); a
    WordPiece tokenizer without one uses [CLS] / [SEP]."""
    if tokenizer.eos_id is not None:
      start = end = tokenizer.eos_id
    elif tokenizer.cls_id is not None and tokenizer.sep_id is not None:
      start, end = tokenizer.cls_id, tokenizer.sep_id
    else:
      raise ValueError(f"the {tokenizer.kind} tokenizer has neither an end-of-text token"
                       " nor [CLS]/[SEP] to start and end a target.")
    return cls(start, end, end if tokenizer.pad_id is None else tokenizer.pad_id)


class Seq2SeqBatches:
  """Batches of tokenized pairs; `batch(step)` is a pure function of (seed, step).

  Padded: one pair a row. Packed: pairs are laid greedily into rows (in an
  order shuffled once by the seed, then kept) while both the source and the
  target still fit, and the rows are what the batch schedule shuffles.
  """

  def __init__(self, pairs: ParallelText, tokenizer: Tokenizer, seq_len: int,
               batch_size: int, seed: int, *, packing: bool = False,
               label_smoothing: float = 0.0, too_long: str = "error",
               process_index: int = 0, process_count: int = 1):
    if too_long not in TOO_LONG:
      raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    if seq_len < 2:
      raise ValueError(f"seq_len must be >= 2 (a token and the end token), got {seq_len}")
    self.specials = Specials.of(tokenizer)
    self.seq_len, self.packing = seq_len, packing
    self.label_smoothing = float(label_smoothing)
    sources, targets = tokenizer.encode_batch(pairs.sources), tokenizer.encode_batch(
        pairs.targets)
    keep = []
    for i, (s, t) in enumerate(zip(sources, targets)):
      longest = max(len(s), len(t)) + 1
      if longest <= seq_len:
        keep.append(i)
      elif too_long == "error":
        side = "target" if len(t) >= len(s) else "source"
        raise ValueError(
            f"{pairs.origins[i]}: the {side} is {longest - 1} tokens + the end token ="
            f" {longest}, longer than the {seq_len} positions a side may take"
            f" (config.data.seq_len, at most the model's max_len); raise seq_len and"
            " model.max_len, or set config.data.too_long='skip' to leave such pairs out.")
    if not keep:
      raise ValueError(f"every pair of {pairs.name} is longer than seq_len {seq_len}.")
    self.skipped = len(pairs) - len(keep)
    self.pairs = pairs.subset(keep)
    self._sources = [sources[i] for i in keep]
    self._targets = [targets[i] for i in keep]
    self._rows = (self._pack(seed) if packing
                  else [np.array([i]) for i in range(len(keep))])
    self._schedule = BatchSchedule(len(self._rows), batch_size, seed, process_index,
                                   process_count)

  def __len__(self) -> int:
    return len(self.pairs)

  @property
  def steps_per_epoch(self) -> int:
    return self._schedule.steps_per_epoch

  @property
  def batch_size(self) -> int:
    """Rows of a global batch."""
    return self._schedule.batch_size

  def source_ids(self, index: int) -> np.ndarray:
    """int32 [n]: pair `index`'s source tokens, without the end token."""
    return self._sources[index]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of training batch `step`."""
    rows = self._schedule.train_examples(step)
    return self._batch(rows, np.ones(len(rows), np.float32), self.label_smoothing)

  def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every pair once, in order; the last batch is padded with rows of weight 0."""
    count = self._schedule.num_eval_batches
    for index in range(count if max_batches is None else min(max_batches, count)):
      rows, weights = self._schedule.eval_examples(index)
      yield self._batch(rows, weights, 0.0)

  def _pack(self, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, PACKING_STREAM]).permutation(len(self._sources))
    rows, row, used_s, used_t = [], [], 0, 0
    for i in order:
      s, t = len(self._sources[i]) + 1, len(self._targets[i]) + 1
      if row and (used_s + s > self.seq_len or used_t + t > self.seq_len):
        rows.append(np.array(row))
        row, used_s, used_t = [], 0, 0
      row.append(i)
      used_s, used_t = used_s + s, used_t + t
    rows.append(np.array(row))
    return rows

  def _batch(self, rows, weights, smoothing: float) -> dict[str, np.ndarray]:
    n, length, sp = len(rows), self.seq_len, self.specials
    out = {
        "source_ids": np.full((n, length), sp.pad, np.int32),
        "target_inputs": np.full((n, length), sp.pad, np.int32),
        "targets": np.full((n, length), sp.pad, np.int32),
    }
    segments = {side: np.zeros((n, length), np.int32) for side in ("source", "target")}
    positions = {side: np.zeros((n, length), np.int32) for side in ("source", "target")}
    for r, row in enumerate(rows):
      at_s = at_t = 0
      for k, pair in enumerate(self._rows[row], 1):
        source = np.append(self._sources[pair], sp.end)
        target = self._targets[pair]
        s, t = len(source), len(target) + 1
        out["source_ids"][r, at_s:at_s + s] = source
        out["target_inputs"][r, at_t:at_t + t] = np.append(sp.start, target)
        out["targets"][r, at_t:at_t + t] = np.append(target, sp.end)
        segments["source"][r, at_s:at_s + s] = k
        segments["target"][r, at_t:at_t + t] = k
        positions["source"][r, at_s:at_s + s] = np.arange(s)
        positions["target"][r, at_t:at_t + t] = np.arange(t)
        at_s, at_t = at_s + s, at_t + t
    out["source_padding_mask"] = segments["source"] > 0
    out["loss_mask"] = (segments["target"] > 0).astype(np.float32)
    out["weights"] = np.asarray(weights, np.float32)
    out["label_smoothing"] = np.full((n,), smoothing, np.float32)
    if self.packing:
      for side in ("source", "target"):
        out[f"{side}_positions"] = positions[side]
        out[f"{side}_segment_ids"] = segments[side]
    return out


def describe(batches: Seq2SeqBatches, what: str) -> str:
  """'<what> (N pairs[, M longer than seq_len left out])'."""
  skipped = f", {batches.skipped} longer than seq_len left out" if batches.skipped else ""
  return f"{what} ({len(batches)} pairs{skipped})"
