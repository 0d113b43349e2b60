"""Exact match and F1 exactly as the official SQuAD evaluation scripts define them.

Our own implementation of the definitions in the scripts that ship with the
data (evaluate-v1.1.py, evaluate-v2.0.py; Rajpurkar et al. 2016, 2018), so
figures compare with published ones:

  normalize    lower-case; drop every character in string.punctuation; replace
               the words a, an, the (regex \\b(a|an|the)\\b) by a space; collapse
               whitespace
  exact match  normalize(prediction) == normalize(gold)
  F1           over the normalised whitespace tokens: shared tokens counted with
               multiplicity (Counter intersection), P = shared / predicted,
               R = shared / gold, F1 = 2PR / (P + R); 0 when nothing is shared
  a question   the best score over its gold answers; the totals are the means
               over questions, times 100

SQuAD 2.0 (version2): gold answers that normalise to "" are dropped and an
unanswerable question's only gold answer is "", and F1 is 1 when prediction
and gold are both empty (0 when only one is); the summary adds HasAns_* and
NoAns_* over the answerable and unanswerable questions. SQuAD 1.1 keeps every
gold answer and F1 is 0 whenever nothing is shared, empty or not.
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """Lower case, no punctuation, no articles, single spaces (the scripts' order)."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, *, version2: bool = True) -> float:
  """Token F1 of one prediction against one gold answer."""
  predicted = normalize_answer(prediction).split() if prediction else []
  wanted = normalize_answer(gold).split() if gold else []
  if version2 and (not predicted or not wanted):
    return float(predicted == wanted)
  shared = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
  if shared == 0:
    return 0.0
  precision, recall = shared / len(predicted), shared / len(wanted)
  return 2 * precision * recall / (precision + recall)


def gold_answers(answers, version2: bool) -> list[str]:
  """The texts a prediction is scored against (see the module docstring)."""
  texts = [text for text, *_ in answers]
  if not version2:
    return texts
  return [t for t in texts if normalize_answer(t)] or [""]


def squad_scores(questions, predictions: dict[str, str], *, version2: bool) -> dict:
  """{"exact_match", "f1" (means over questions, 0-100), "questions"}, and for
  version2 HasAns_exact / _f1 / _total and NoAns_* as the v2.0 script names them.

  questions: research.data.squad.Question records (qid, answers). A question
  without a prediction scores as the prediction "" (predictions here cover
  every question; the v1.1 script counts a missing one as wrong).
  """
  exact, f1s, answerable = [], [], []
  for q in questions:
    golds = gold_answers(q.answers, version2)
    prediction = predictions.get(q.qid, "")
    exact.append(max(exact_match(prediction, g) for g in golds))
    f1s.append(max(f1(prediction, g, version2=version2) for g in golds))
    answerable.append(bool(q.answers))
  result = {"exact_match": _percent(exact), "f1": _percent(f1s), "questions": len(exact)}
  if version2:
    for name, keep in (("HasAns", True), ("NoAns", False)):
      picked = [i for i, a in enumerate(answerable) if a == keep]
      if picked:
        result.update({f"{name}_exact": _percent([exact[i] for i in picked]),
                       f"{name}_f1": _percent([f1s[i] for i in picked]),
                       f"{name}_total": len(picked)})
  return result


def _percent(scores: list[float]) -> float:
  return 100.0 * sum(scores) / max(len(scores), 1)
