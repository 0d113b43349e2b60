"""Summarization: ROUGE as rouge-score computes it, the decoding constraints
(minimum length, no repeated n-grams) in every way of decoding, the built-in
pairs, and a smoke run through train, evaluate and translate."""

import json

import numpy as np
import pytest
from rouge_score import rouge_scorer

from fusedlm.research import objectives, run_config, translate
from fusedlm.research.data import stdlib_summaries
from fusedlm.research.inference import seq2seq_decoding
from fusedlm.research.models import random_params
from fusedlm.research.models import config as model_config
from fusedlm.research.objectives import seq2seq, summarization
from fusedlm.research.training import eval_loop, loop
from tests.commands import fusedlm
from tests.research.conftest import load_experiment

EOS = 2


def test_rouge_against_rouge_score_on_known_pairs():
  hypotheses = ["the cat sat on the mat", "cats running fast", "a b c d"]
  references = [["the cat sat on a mat"], ["cat runs"], ["x y", "b c d e"]]
  got = summarization.rouge_scores(hypotheses, references)
  # By hand (F-measures): pair 1, unigrams 5 of 6 each way -> 5/6; bigrams
  # the-cat, cat-sat, sat-on of 5 -> 3/5; LCS "the cat sat on mat" -> 5/6.
  # Pair 2, stemmed: cat run fast vs cat run -> R1 2*(2/3)/(5/3) = 0.8,
  # R2 1 of 2 / 1 of 1 -> 2/3, RL 0.8. Pair 3, the better reference "b c d e":
  # R1 3/4 each way -> 0.75, R2 2/3 each -> 2/3, RL 0.75.
  by_hand = {"rouge1": (5 / 6 + 0.8 + 0.75) / 3, "rouge2": (3 / 5 + 2 / 3 + 2 / 3) / 3,
             "rougeL": (5 / 6 + 0.8 + 0.75) / 3}
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  package = [scorer.score_multi(r, h) for h, r in zip(hypotheses, references)]
  for name, value in by_hand.items():
    np.testing.assert_allclose(got[name], 100 * value, rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(got[name], 100 * np.mean([p[name].fmeasure for p in package]),
                               rtol=1e-12, err_msg=name)
  assert got["summaries"] == 3 and got["references"] == 4
  with pytest.raises(ValueError, match="2 summaries for 1 reference sets"):
    summarization.rouge_scores(["a", "b"], [["a"]])


@pytest.fixture(scope="module")
def repetitive_model():
  """A random encoder-decoder whose outputs repeat themselves and end early."""
  cfg = model_config.tiny_seq2seq(vocab_size=11, hidden_size=32, num_layers=2, num_heads=4,
                                  mlp_dim=64, max_len=24, dtype="float32", attention="xla")
  params = random_params(cfg, std=0.3)
  table = np.array(params["token_embedding"]["embedding"])
  table[EOS] *= 2.5
  params["token_embedding"]["embedding"] = table
  sources = [np.random.default_rng(i).integers(3, 11, 5) for i in range(10)]
  return cfg, params, sources


def _decode(model, **options):
  cfg, params, sources = model
  tokens, _ = seq2seq_decoding.translate_ids(cfg, params, sources, max_new_tokens=16,
                                             start_id=EOS, eos_id=EOS, **options)
  return tokens


def _repeats(tokens, n):
  grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
  return len(grams) - len(set(grams))


def test_repeated_ngram_tokens_against_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(50):
    vocab, length, n = 5, int(rng.integers(1, 10)), int(rng.integers(1, 4))
    out, t = rng.integers(0, vocab, (3, length)), int(rng.integers(0, length + 1))
    want = np.zeros((3, vocab), bool)
    for r in range(3):
      seen = list(out[r, :t])
      for i in range(t - n + 1):  # an n-gram wholly before t whose first n - 1
        if seen[i:i + n - 1] == seen[t - n + 1:t]:  # tokens end the output so far
          want[r, seen[i + n - 1]] = True
    got = seq2seq_decoding.repeated_ngram_tokens(out, t, n, vocab)
    np.testing.assert_array_equal(got, want, err_msg=f"{out}, t={t}, n={n}")


# Sampling shares greedy decoding's loop and its constraint step.
@pytest.mark.parametrize("how", [dict(), dict(beam_size=3, length_penalty=0.6)])
def test_minimum_length_and_no_repeated_ngrams(repetitive_model, how):
  free = _decode(repetitive_model, **how)
  assert min(map(len, free)) < 6 and sum(_repeats(t, 2) for t in free) > 0
  longer = _decode(repetitive_model, min_new_tokens=6, **how)
  assert all(len(t) >= 7 or t[-1] != EOS for t in longer)  # 6 tokens, then the end
  assert all(EOS not in t[:6] for t in longer)
  plain = _decode(repetitive_model, no_repeat_ngram_size=2, **how)
  assert all(_repeats(t, 2) == 0 for t in plain)
  with pytest.raises(ValueError, match=r"min_new_tokens must be an int in \[0, max_new_tokens"):
    _decode(repetitive_model, min_new_tokens=17, **how)
  with pytest.raises(ValueError, match="no_repeat_ngram_size must be an int >= 0"):
    _decode(repetitive_model, no_repeat_ngram_size=-1, **how)


def test_builtin_pairs_and_their_baseline():
  pairs = stdlib_summaries.summary_pairs()
  assert len(pairs) > 1500
  assert all(s and t and "\n" not in t for s, t in zip(pairs.sources, pairs.targets))
  assert max(len(s.split()) for s in pairs.sources) <= stdlib_summaries.MAX_SOURCE_WORDS
  assert stdlib_summaries.lead("Return x. Then y. More") == "Return x."
  config = run_config.defaults("summarization")
  train, validation = seq2seq.pairs_of(config)
  assert len(train) + len(validation) == len(pairs)
  baseline = summarization.rouge_scores(stdlib_summaries.lead_baseline(validation),
                                        [[t] for t in validation.targets])
  assert 10.0 < baseline["rouge1"] < 40.0  # the floor README states


def test_configs_validate():
  for arg in ("", run_config.RUNLOCAL):
    config = load_experiment("summarize_stdlib", arg)
    run_config.validate(config)
  config = run_config.defaults("summarization")
  assert config.data.corpus == "stdlib_summaries" and config.decode.no_repeat_ngram_size == 3
  config.decode.min_new_tokens = -1
  with pytest.raises(ValueError, match="config.decode.min_new_tokens must be >= 0"):
    run_config.validate(config)
  config = run_config.defaults("summarization")
  config.data.target_file = "x.txt"
  with pytest.raises(ValueError, match="not the built-in task 'stdlib_summaries'"):
    run_config.validate(config)
  assert objectives.get("summarization").report_keys[-3:] == ("rouge1", "rouge2", "rougeL")


def test_smoke_run_train_evaluate_translate(tmp_path, shared_cache_dir):
  """:runlocal's model on user pairs (a .jsonl with named fields), a few steps."""
  rng = np.random.default_rng(0)
  words = "ab cd ef gh ij kl mn op qr st".split()  # short: the smoke tokenizer is bytes
  with open(tmp_path / "pairs.jsonl", "w") as f:
    for _ in range(96):
      body = " ".join(rng.choice(words, 8))
      f.write(json.dumps({"document": body, "summary": " ".join(body.split()[:3])}) + "\n")
  config = load_experiment("summarize_stdlib", run_config.RUNLOCAL)
  config.data.update(corpus=str(tmp_path / "pairs.jsonl"), source_field="document",
                     target_field="summary", validation_fraction=0.2,
                     cache_dir=shared_cache_dir)
  config.train.update(steps=6, eval_every=6)
  config.checkpoint.every = 6
  workdir = tmp_path / "run"
  loop.train(config, workdir, progress=False)
  result = eval_loop.evaluate_run(workdir, max_batches=1)
  for key in ("rouge1", "rouge2", "rougeL"):
    assert 0.0 <= result["metrics"][key] <= 100.0
  assert result["metrics"]["decoding"] == ("beam 4, length penalty 0.6, at least 3 tokens,"
                                           " no repeated 3-grams")
  assert len(result["outputs"]["hypotheses"]) == result["metrics"]["summaries"]
  record = translate.run_translation(workdir, ["ab cd ef gh"],
                                     references=["ab cd ef"], beam_size=0,
                                     no_repeat_ngram_size=2)
  assert set(record["scores"]) >= {"rouge1", "rouge2", "rougeL"}
  assert record["decoding"]["no_repeat_ngram_size"] == 2
  out = fusedlm("translate", "--workdir", workdir, "--text", "ab cd",
                "--min_new_tokens", "99")
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert "min_new_tokens must be an int in [0, max_new_tokens = 32], got 99" in out.stderr
