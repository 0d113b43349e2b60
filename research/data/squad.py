"""SQuAD-format question answering data: read, check, split.

The format (Rajpurkar et al. 2016, 2018) is the one users have:

  {"version": "v2.0", "data": [{"title": ..., "paragraphs": [
      {"context": "...", "qas": [
          {"id": "q1", "question": "...",
           "answers": [{"text": "...", "answer_start": 17}, ...],
           "is_impossible": false}]}]}]}

v1.1 files have no "is_impossible"; in v2.0 files an unanswerable question
has "is_impossible": true and no answers ("plausible_answers" are ignored).
A file with any unanswerable question is scored as v2.0 (`QAData.version2`):
predictions may then be "" (no answer). Training reads each question's first
answer; evaluation scores against all of them.

Every answer is checked against its context: context[answer_start :
answer_start + len(text)] must be the answer's text, or the file is refused
naming the question id (an offset off by one, or a context edited after the
answers were marked, would train on the wrong span silently).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from fusedlm.research.data.corpus import document_hash


@dataclasses.dataclass(frozen=True)
class Question:
  """One question about one context.

  Attributes:
    qid: the question's id (the key of predictions.json).
    question: its text.
    context: the paragraph the answer is taken from.
    answers: (text, first character in context) of each gold answer; () for an
      unanswerable (v2.0) question.
  """

  qid: str
  question: str
  context: str
  answers: tuple[tuple[str, int], ...]

  @property
  def answerable(self) -> bool:
    return bool(self.answers)


@dataclasses.dataclass(frozen=True)
class QAData:
  """Questions in file order; version2: some are unanswerable (SQuAD 2.0)."""

  questions: list[Question]
  name: str
  version2: bool

  def __len__(self) -> int:
    return len(self.questions)

  def subset(self, index) -> "QAData":
    return QAData([self.questions[i] for i in index], self.name, self.version2)


def load_squad(path: str | os.PathLike) -> QAData:
  """Reads a SQuAD v1.1 / v2.0 JSON file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not JSON, not SQuAD's layout, a missing field, a repeated
      question id, or an answer whose text is not the context at its offset;
      each names the file and the question id (or the article and paragraph).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no SQuAD file at {path}")
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON (truncated?): {e}") from e
  articles = record.get("data") if isinstance(record, dict) else None
  if not isinstance(articles, list):
    raise ValueError(f"{path} is not in SQuAD's format: expected an object with a"
                     ' "data" list of articles.')
  questions: list[Question] = []
  seen: set[str] = set()
  version2 = False
  for a, article in enumerate(articles):
    for p, paragraph in enumerate(_field(article, "paragraphs", list,
                                         f"{path}: article {a}")):
      where = f"{path}: article {a}, paragraph {p}"
      context = _field(paragraph, "context", str, where)
      for qa in _field(paragraph, "qas", list, where):
        qid = str(_field(qa, "id", (str, int), where))
        where_q = f"{path}: question {qid!r}"
        if qid in seen:
          raise ValueError(f"{where_q}: the id occurs twice; question ids must be unique.")
        seen.add(qid)
        impossible = bool(qa.get("is_impossible", False))
        version2 |= impossible
        answers = tuple(_answer(item, context, where_q)
                        for item in _field(qa, "answers", list, where_q))
        if impossible and answers:
          raise ValueError(f"{where_q}: is_impossible is true but it has answers (SQuAD"
                           ' 2.0 puts those under "plausible_answers").')
        if not impossible and not answers:
          raise ValueError(f"{where_q}: no answers, and not marked is_impossible.")
        questions.append(Question(qid, _field(qa, "question", str, where_q), context,
                                  answers))
  if not questions:
    raise ValueError(f"{path} holds no questions.")
  return QAData(questions, path.name, version2)


def _field(record, key: str, kind, where: str):
  if not isinstance(record, dict) or key not in record:
    raise ValueError(f"{where}: missing field {key!r}.")
  value = record[key]
  if not isinstance(value, kind):
    raise ValueError(f"{where}: field {key!r} has the wrong type"
                     f" ({type(value).__name__}).")
  return value


def _answer(item, context: str, where: str) -> tuple[str, int]:
  text = _field(item, "text", str, where)
  start = _field(item, "answer_start", int, where)
  found = context[start:start + len(text)] if 0 <= start <= len(context) else None
  if found != text or not text:
    raise ValueError(f"{where}: the answer {text!r} does not match its context at"
                     f" answer_start {start} (the context there reads {found!r}).")
  return text, start


def split_questions(data: QAData, validation_fraction: float) -> tuple[QAData, QAData]:
  """(train, validation) by a hash of each question's context, so that the
  questions about one paragraph stay on one side (as SQuAD's own split keeps
  articles apart)."""
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  threshold = int(validation_fraction * 2**64)
  held_out = np.array([document_hash(q.context) < threshold for q in data.questions])
  if held_out.all() or not held_out.any():
    raise ValueError(
        f"holding out {validation_fraction:.0%} of the contexts of {data.name} leaves an"
        f" empty {'train' if held_out.all() else 'validation'} part; give a validation"
        " file or more questions.")
  return data.subset(np.flatnonzero(~held_out)), data.subset(np.flatnonzero(held_out))


def write_squad(data: QAData, path: str | os.PathLike) -> Path:
  """Writes `data` as a SQuAD JSON file (one paragraph per distinct context), atomically."""
  paragraphs: dict[str, list] = {}
  for q in data.questions:
    paragraphs.setdefault(q.context, []).append(
        {"id": q.qid, "question": q.question, "is_impossible": not q.answerable,
         "answers": [{"text": t, "answer_start": s} for t, s in q.answers]})
  record = {"version": "v2.0" if data.version2 else "1.1", "data": [{
      "title": data.name, "paragraphs": [{"context": c, "qas": qas}
                                         for c, qas in paragraphs.items()]}]}
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
  partial.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n",
                     encoding="utf-8")
  os.replace(partial, path)
  return path
