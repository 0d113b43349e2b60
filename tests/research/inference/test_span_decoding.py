"""Span decoding: the best valid span is found exactly, across windows, with
SQuAD 2.0's no-answer rule; the model's span head reads every position."""

import ml_collections
import numpy as np
import pytest

from fusedlm.research.data import qa_windows, squad
from fusedlm.research.data.tokenizer import train_tokenizer
from fusedlm.research.inference import span_decoding
from fusedlm.research.models import build_model, random_params
from fusedlm.research.models import config as model_config
from fusedlm.research.objectives import qa, squad_scores
from tests.research.data.test_squad import ANSWERS, CONTEXTS, sample_file


def _brute_force(start, end, first, stop, longest, usable):
  best = None
  for s in range(first, stop):
    for e in range(s, min(stop, s + longest)):
      if usable[s - first] and usable[e - first]:
        score = start[s] + end[e]
        if best is None or score > best[0]:
          best = (score, s, e)
  return best


def test_best_span_is_the_best_valid_pair():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(1, 20))
    start, end = rng.normal(size=n), rng.normal(size=n)
    first, stop = sorted(rng.integers(0, n + 1, 2))
    longest = int(rng.integers(1, 6))
    usable = rng.random(max(stop - first, 0)) > 0.2
    got = span_decoding.best_span(start, end, first, stop, longest, usable)
    want = _brute_force(start, end, first, stop, longest, usable)
    if want is None:
      assert got is None
    else:
      np.testing.assert_allclose(got[0], want[0])
      assert got[1:] == want[1:]


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
  texts = CONTEXTS + [q for _, q, _ in ANSWERS]
  tokenizer = train_tokenizer("wordpiece", texts * 4, 400)
  data = squad.load_squad(sample_file(tmp_path_factory.mktemp("squad") / "v2.json"))
  return qa_windows.SpanBatches(data, tokenizer, 32, 4, 12, batch_size=8, seed=0)


def _logits(batches, null=5.0):
  """Logits that point every window at its label: answer windows at the answer
  (score 10 + 10), and [CLS] at 2 * null in every window; other spans -1 + -1."""
  logits = np.zeros((len(batches), batches.seq_len, 2), np.float32)
  for i, w in enumerate(batches.windows):
    logits[i, :, :] = -1.0
    logits[i, 0, :] = null
    if w.start:
      logits[i, w.start, 0] = logits[i, w.end, 1] = 10.0
  return logits


def test_answers_come_from_the_window_that_holds_them(batches):
  data = batches.data
  assert len(batches) > 2 * len(data)  # several windows a question
  answers, null_odds = span_decoding.predict_answers(batches, _logits(batches))
  for q in data.questions:
    assert answers[q.qid] == (q.answers[0][0] if q.answerable else ""), q.qid
  scores = squad_scores.squad_scores(data.questions, answers, version2=True)
  assert scores["exact_match"] == scores["f1"] == 100.0
  # The unanswerable question's best span is a -1 + -1 one; null = 10.
  assert null_odds["q10"] == pytest.approx(10 - -2)
  assert null_odds["q0"] == pytest.approx(10 - 20)
  # null is the least [CLS] score over the windows: one window at -50 wins.
  logits = _logits(batches, null=20.0)
  answers, _ = span_decoding.predict_answers(batches, logits)
  assert answers["q0"] == ""  # 40 > 20 over every window of q0
  first_q0 = next(i for i, w in enumerate(batches.windows) if w.question == 0)
  logits[first_q0, 0, :] = -25.0
  answers, odds = span_decoding.predict_answers(batches, logits)
  assert answers["q0"] == "1889" and odds["q0"] == pytest.approx(-50 - 20)
  # A threshold above the odds keeps the span; SQuAD 1.1 never answers "".
  answers, _ = span_decoding.predict_answers(batches, _logits(batches, 20.0),
                                             no_answer_threshold=25.0)
  assert answers["q0"] == "1889"
  answers, _ = span_decoding.predict_answers(batches, _logits(batches, 20.0),
                                             allow_no_answer=False)
  assert all(answers.values())
  # max_answer_len: a 1-token limit cannot give the 3-token answer.
  answers, _ = span_decoding.predict_answers(batches, _logits(batches), max_answer_len=1)
  assert answers["q2"] != "the Chrysler Building"
  # Logits of a prefix of the windows answer the questions they cover whole.
  cut = next(i for i, w in enumerate(batches.windows) if w.question == 3) + 1
  answers, _ = span_decoding.predict_answers(batches, _logits(batches)[:cut])
  assert sorted(answers) == ["q0", "q1", "q2"]


def test_span_head_reads_every_position_and_is_trained_fresh():
  cfg = model_config.tiny_bert(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2,
                               mlp_dim=64, max_len=16, dtype="float32", attention="xla",
                               mlm=False, span_head=True)
  params = random_params(cfg)
  model = build_model(cfg)
  ids = np.arange(24, dtype=np.int32).reshape(2, 12) % 50
  mask = np.ones_like(ids, bool)
  logits = model.apply({"params": params}, ids, None, mask, method="span_logits")
  assert logits.shape == (2, 12, 2) and logits.dtype == np.float32
  full = model.apply({"params": params}, ids, None, mask)["span_logits"]
  np.testing.assert_allclose(logits, full, rtol=1e-6)
  # Bidirectional: position 0's logits depend on the last token.
  changed = ids.copy()
  changed[:, -1] = (changed[:, -1] + 1) % 50
  moved = model.apply({"params": params}, changed, None, mask, method="span_logits")
  assert np.abs(np.asarray(moved[:, 0]) - np.asarray(logits[:, 0])).max() > 1e-6
  with pytest.raises(ValueError, match="span_head=True needs kind='encoder'"):
    model_config.tiny_gpt(span_head=True)
  pretrained = cfg.replace(span_head=False, mlm=True, nsp=True)
  config = ml_collections.ConfigDict({"model": {"dropout": 0.1}, "data": {"seq_len": 16}})
  made = qa.model_config(config, 50, pretrained)
  assert made.span_head and not made.mlm and not made.nsp and made.dropout == 0.1
  with pytest.raises(ValueError, match="needs a pretrained encoder"):
    qa.model_config(config, 50, model_config.tiny_gpt(vocab_size=50))
