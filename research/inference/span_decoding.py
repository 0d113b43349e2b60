"""Answers from an extractive-QA model: the best valid span across a question's windows.

  logits = window_logits(model_cfg, params, batches)          # [windows, seq, 2]
  answers, null_odds = predict_answers(batches, logits, max_answer_len=30)

A span (s, e) of a window scores start_logit[s] + end_logit[e] (Devlin et al.
2019, section 4.2); it is valid when both ends are context tokens of that
window, e >= s, and it is at most max_answer_len tokens long. A question's
answer is the context text of its best valid span over all its windows
(research.data.qa_windows.span_text), found exactly (every pair, not an
n-best list of starts and ends).

No answer (SQuAD 2.0, Devlin et al. 2019 section 4.3): the null score is
start_logit[CLS] + end_logit[CLS], its least value over the question's
windows, as BERT's run_squad.py takes it; the prediction is "" when
null - best > no_answer_threshold. null_odds (null - best, per question) is
what the official v2.0 evaluation script takes as --na-prob-file to search
for the best threshold.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from fusedlm.research import models
from fusedlm.research.data.qa_windows import SpanBatches, span_text
from fusedlm.research.models.config import ModelConfig

NO_SPAN_ODDS = 1e9  # finite: predictions JSON stays strict JSON


def window_logits(model_cfg: ModelConfig, params, batches: SpanBatches,
                  max_batches: int | None = None) -> np.ndarray:
  """float32 [windows, seq_len, 2]: (start, end) logits of every window in
  `batches` (of the first max_batches batches' windows with max_batches)."""
  apply = _compiled_span_logits(model_cfg)
  parts = []
  for batch in batches.eval_batches(max_batches):
    logits = apply(params, batch["input_ids"], batch["token_type_ids"],
                   batch["padding_mask"])
    parts.append(np.asarray(logits)[batch["weights"] > 0])
  return np.concatenate(parts)


@functools.lru_cache(maxsize=8)
def _compiled_span_logits(model_cfg: ModelConfig):
  model = models.build_model(model_cfg)
  return jax.jit(lambda params, ids, types, mask: model.apply(
      {"params": params}, ids, types, mask, method="span_logits"))


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, first: int, stop: int,
              max_answer_len: int, usable: np.ndarray | None = None
              ) -> tuple[float, int, int] | None:
  """(score, s, e) of the best valid span with first <= s <= e < stop, or None.

  Args:
    start_logits, end_logits: float [seq] of one window.
    first, stop: the window's context positions [first, stop).
    max_answer_len: most tokens in a span (e - s + 1).
    usable: bool [stop - first]: which context tokens may start or end a span
      (False for whitespace-only tokens); None = all.
  """
  if stop <= first or max_answer_len < 1:
    return None
  starts = np.asarray(start_logits[first:stop], np.float64)
  ends = np.asarray(end_logits[first:stop], np.float64)
  scores = starts[:, None] + ends[None, :]  # [s, e]
  gap = np.arange(stop - first)[None, :] - np.arange(stop - first)[:, None]  # e - s
  valid = (gap >= 0) & (gap < max_answer_len)
  if usable is not None:
    valid &= usable[:, None] & usable[None, :]
  if not valid.any():
    return None
  flat = int(np.argmax(np.where(valid, scores, -np.inf)))
  s, e = divmod(flat, stop - first)
  return float(scores[s, e]), s + first, e + first


def predict_answers(batches: SpanBatches, logits: np.ndarray, *, max_answer_len: int = 30,
                    no_answer_threshold: float = 0.0, allow_no_answer: bool | None = None,
                    ) -> tuple[dict[str, str], dict[str, float]]:
  """({question id: answer text}, {question id: null - best score}).

  Covers the questions all of whose windows have logits (logits holds the
  first len(logits) windows). allow_no_answer None = the data's own kind
  (SQuAD 2.0 data may answer ""); with it False, the best span is always
  given, as for SQuAD 1.1.
  """
  data = batches.data
  allow = data.version2 if allow_no_answer is None else allow_no_answer
  best: dict[int, tuple[float, str]] = {}
  null: dict[int, float] = {}
  complete = set()
  for index, window in enumerate(batches.windows):
    q = window.question
    if index >= len(logits):
      complete.discard(q)
      break
    complete.add(q)
    start, end = logits[index, :, 0], logits[index, :, 1]
    null[q] = min(null.get(q, np.inf), float(start[0] + end[0]))
    offsets = window.offsets
    found = best_span(start, end, window.context_start, window.context_end,
                      max_answer_len, usable=offsets[:, 1] > offsets[:, 0])
    if found is not None and found[0] > best.get(q, (-np.inf, ""))[0]:
      score, s, e = found
      text = span_text(data.questions[q].context, offsets, s - window.context_start,
                       e - window.context_start)
      best[q] = (score, text)
  answers, null_odds = {}, {}
  for q in sorted(complete):
    qid = data.questions[q].qid
    score, text = best.get(q, (-np.inf, ""))
    # No valid span at all (a window without context tokens): surely no answer.
    null_odds[qid] = null[q] - score if np.isfinite(score) else NO_SPAN_ODDS
    answers[qid] = "" if allow and null_odds[qid] > no_answer_threshold else text
  return answers, null_odds
