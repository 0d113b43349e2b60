"""Exact match and F1 equal the official SQuAD scripts' definitions, worked by hand."""

import pytest

from fusedlm.research.data.squad import Question
from fusedlm.research.objectives import squad_scores as s


@pytest.mark.parametrize("text,normalized", [
    ("The Eiffel Tower", "eiffel tower"),  # articles go, case folds
    ("an apple a day", "apple day"),
    ("theatre, anthem, Athens", "theatre anthem athens"),  # only whole words are articles
    ("U.S.A.", "usa"),  # punctuation is deleted, not spaced
    ("  New\tYork\n City ", "new york city"),
    ("rock'n'roll (1950s)!", "rocknroll 1950s"),
    ("café — ½", "café — ½"),  # only ASCII punctuation (string.punctuation) goes
    ("the", ""),
])
def test_normalization(text, normalized):
  assert s.normalize_answer(text) == normalized


def test_exact_match_and_f1_by_hand():
  assert s.exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
  assert s.exact_match("Eiffel", "Eiffel Tower") == 0.0
  # "big red dog" vs "red dog barked": 2 shared of 3 and 3 -> P = R = F1 = 2/3.
  assert s.f1("The big red dog", "red dog barked") == pytest.approx(2 / 3)
  # Shared tokens count with multiplicity: "b b c" vs "b c c" share one b and one c.
  assert s.f1("b b c", "b c c") == pytest.approx(2 / 3)
  # P = 1/1, R = 1/4 -> F1 = 2 * 1 * 0.25 / 1.25 = 0.4.
  assert s.f1("Paris", "in Paris, France, 1889") == pytest.approx(0.4)
  assert s.f1("London", "Paris") == 0.0
  # No answer (v2.0): 1 only when both are empty.
  assert s.f1("", "") == 1.0 and s.exact_match("", "") == 1.0
  assert s.f1("Paris", "") == 0.0 and s.f1("", "Paris") == 0.0
  assert s.f1("the", "a") == 1.0  # both normalise to nothing
  # v1.1 has no such case: nothing shared is 0, empty or not.
  assert s.f1("", "", version2=False) == 0.0 and s.f1("the", "a", version2=False) == 0.0


def _q(qid, *answers):
  return Question(qid, "?", "context", tuple((a, 0) for a in answers))


def test_totals_take_the_best_gold_and_split_has_and_no_answer():
  questions = [_q("a", "Denver Broncos", "the Broncos"),  # golds: best is taken
               _q("b", "1889"),
               _q("c"),  # unanswerable
               _q("d"),
               _q("e", "the")]  # a gold that normalises to "": v2.0 drops it
  predictions = {"a": "Broncos", "b": "in 1889", "c": "", "d": "Paris", "e": ""}
  result = s.squad_scores(questions, predictions, version2=True)
  # a: "the Broncos" -> "broncos": EM 1, F1 1 (the other gold: F1 2/3);
  # b: EM 0, F1 2*.5*1/1.5 = 2/3; c: 1, 1; d: 0, 0; e: gold [""] -> 1, 1.
  assert result["exact_match"] == pytest.approx(100 * 3 / 5)
  assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0 + 1) / 5)
  assert result["questions"] == 5
  assert result["HasAns_total"] == 3 and result["NoAns_total"] == 2
  assert result["HasAns_exact"] == pytest.approx(200 / 3)
  assert result["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
  assert result["NoAns_exact"] == result["NoAns_f1"] == pytest.approx(50.0)
  v1 = s.squad_scores(questions[:2] + questions[4:], predictions, version2=False)
  # v1.1 keeps the gold "the": EM 1 (both normalise to ""), F1 0.
  assert v1["exact_match"] == pytest.approx(200 / 3)
  assert v1["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
  assert "HasAns_f1" not in v1
  missing = s.squad_scores(questions[:2], {"a": "the broncos"}, version2=True)
  assert missing["exact_match"] == pytest.approx(50.0)  # b: no prediction, scored as ""
