"""Seq2seq: the loss, packed = padded, cached greedy / beam decoding against full
recomputation, beam 1 = greedy, refusals, and the synthetic task learned to BLEU >= 95."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.research import objectives, run_config, translate
from fusedlm.research.data import synthetic_translation
from fusedlm.research.data.parallel_text import ParallelText, Seq2SeqBatches
from fusedlm.research.data.tokenizer import train_tokenizer
from fusedlm.research.inference import generation, seq2seq_decoding
from fusedlm.research.inference.sampling import Sampling
from fusedlm.research.models import build_model, random_params
from fusedlm.research.models import config as model_config
from fusedlm.research.objectives import seq2seq
from fusedlm.research.training import eval_loop, loop
from tests.commands import fusedlm
from tests.research.conftest import load_experiment

VOCAB = 13  # small: end-of-text (id 2) is likely enough that outputs finish
EOS = 2


def _config(**changes):
  return model_config.tiny_seq2seq(
      vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
      max_len=24, dtype="float32", attention="xla").replace(**changes)


def _sources(n=6, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB, rng.integers(2, 9)) for _ in range(n)]


def test_label_smoothed_loss_matches_its_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (3, 5))
  mask = (np.arange(5)[None] < np.array([[5], [2], [4]])).astype(np.float32)
  batch = {"targets": targets, "loss_mask": mask, "weights": np.array([1, 1, 0], np.float32),
           "label_smoothing": np.full(3, 0.2, np.float32)}
  loss, sums = seq2seq.seq2seq_loss(jnp.asarray(logits), batch)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  per_token = 0.8 * nll + 0.2 * -log_p.mean(-1)
  weights = mask * np.array([1, 1, 0])[:, None]
  np.testing.assert_allclose(sums["loss_sum"], (per_token * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(sums["count"], 7.0)
  np.testing.assert_allclose(loss, (per_token * weights).sum() / 7, rtol=1e-5)
  batch["label_smoothing"] = np.zeros(3, np.float32)  # evaluation: plain cross-entropy
  plain, _ = objectives.causal_lm_loss(jnp.asarray(logits), {
      "targets": targets, "loss_mask": mask, "weights": batch["weights"]})
  np.testing.assert_allclose(seq2seq.seq2seq_loss(jnp.asarray(logits), batch)[0], plain,
                             rtol=1e-6)


def test_packed_batches_score_the_pairs_as_padded_ones_do():
  tokenizer = train_tokenizer("byte", [])
  rng = np.random.default_rng(0)
  words = ["ab", "cde", "f", "ghij"]
  text = lambda: " ".join(rng.choice(words, rng.integers(1, 4)))
  pairs = ParallelText([text() for _ in range(16)], [text() for _ in range(16)],
                       [f"x:{i}" for i in range(16)], "x")
  cfg = model_config.tiny_seq2seq(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                  num_heads=2, mlp_dim=64, max_len=32, dtype="float32",
                                  attention="xla")
  model, params = build_model(cfg), random_params(cfg)
  step = jax.jit(lambda batch: seq2seq.seq2seq_loss(
      seq2seq.outputs(model, {"params": params}, batch), batch)[1])
  totals = []
  for packing, batch_size in ((False, 8), (True, 2)):
    batches = Seq2SeqBatches(pairs, tokenizer, 32, batch_size, 0, packing=packing)
    sums = [step(b) for b in batches.eval_batches()]
    totals.append({k: sum(float(s[k]) for s in sums) for k in sums[0]})
  assert totals[1]["count"] == totals[0]["count"] > 0
  np.testing.assert_allclose(totals[1]["loss_sum"], totals[0]["loss_sum"], rtol=1e-5)
  np.testing.assert_allclose(totals[1]["correct"], totals[0]["correct"])


WIDTH = 24  # one padded shape for every recomputation: one compiled program


class Recomputation:
  """Greedy decoding and log-probabilities from full forward passes, no cache.

  Sources and target inputs are right-padded to WIDTH: the source padding is
  masked, and causal attention keeps target padding from earlier positions.
  """

  def __init__(self, cfg, params):
    model = build_model(cfg)
    self._log_p = jax.jit(lambda source, mask, inputs: jax.nn.log_softmax(model.apply(
        {"params": params}, source, inputs, source_padding_mask=mask)))

  def _table(self, source, prefix):  # -> log p [len(prefix) + 1, vocab]
    ids = np.zeros((1, WIDTH), np.int32)
    ids[0, :len(source) + 1] = np.append(source, EOS)
    inputs = np.zeros((1, WIDTH), np.int32)
    inputs[0, :len(prefix) + 1] = np.append(EOS, prefix)
    return np.asarray(self._log_p(ids, ids > 0, inputs))[0, :len(prefix) + 1]

  def log_prob(self, source, output) -> float:
    table = self._table(source, output[:-1])
    return float(table[np.arange(len(output)), output].sum())

  def greedy(self, source, steps: int) -> np.ndarray:
    out = []
    while len(out) < steps and (not out or out[-1] != EOS):
      out.append(int(np.argmax(self._table(source, out)[-1])))
    return np.array(out)


@pytest.fixture(scope="module")
def model_and_params():
  """A random model whose end-of-text row is scaled up, so that some greedy
  outputs finish early and others run to the limit."""
  cfg = _config()
  params = random_params(cfg, std=0.3)
  table = np.array(params["token_embedding"]["embedding"])
  table[EOS] *= 2.5
  params["token_embedding"]["embedding"] = table
  return cfg, params, Recomputation(cfg, params)


def _translate(cfg, params, sources, **kw):
  return seq2seq_decoding.translate_ids(cfg, params, sources, max_new_tokens=kw.pop("steps", 16),
                                start_id=EOS, eos_id=EOS, pad_id=0, **kw)


def test_cached_greedy_decoding_equals_recomputation(model_and_params):
  cfg, params, recompute = model_and_params
  sources = _sources(12)
  tokens, scores = _translate(cfg, params, sources)
  assert any(t[-1] == EOS for t in tokens) and any(t[-1] != EOS for t in tokens)
  for b, (source, got) in enumerate(zip(sources, tokens)):
    np.testing.assert_array_equal(got, recompute.greedy(source, 16), err_msg=f"source {b}")
    np.testing.assert_allclose(scores[b], recompute.log_prob(source, got), rtol=1e-4,
                               atol=1e-4)


def test_beam_one_is_greedy_and_wider_beams_score_no_lower(model_and_params):
  cfg, params, recompute = model_and_params
  sources = _sources(12)
  greedy, greedy_scores = _translate(cfg, params, sources)
  beam1, beam1_scores = _translate(cfg, params, sources, beam_size=1)
  for g, b in zip(greedy, beam1):
    np.testing.assert_array_equal(b, g)
  np.testing.assert_allclose(beam1_scores, greedy_scores, rtol=1e-6)
  finished = np.array([g[-1] == EOS for g in greedy])
  assert finished.sum() >= 3
  for k in (2, 4):
    tokens, scores = _translate(cfg, params, sources, beam_size=k)
    # The score of a beam's output is its model log-probability, recomputed
    # here without a cache: the beams' cache rows were reordered correctly.
    for source, t, s in zip(sources, tokens, scores):
      np.testing.assert_allclose(s, recompute.log_prob(source, t), rtol=1e-4, atol=1e-4)
    assert (scores[finished] >= greedy_scores[finished] - 1e-5).all(), (k, scores,
                                                                       greedy_scores)
  # A length penalty favours longer outputs, never shorter ones, here.
  long, _ = _translate(cfg, params, sources, beam_size=4, length_penalty=2.0)
  short, _ = _translate(cfg, params, sources, beam_size=4)
  assert sum(map(len, long)) >= sum(map(len, short))


def test_sampling_is_reproducible_for_a_seed(model_and_params):
  cfg, params, recompute = model_and_params
  sources = _sources()
  sampling = Sampling(temperature=1.0)
  a, a_scores = _translate(cfg, params, sources, sampling=sampling, seed=3)
  b, _ = _translate(cfg, params, sources, sampling=sampling, seed=3)
  c, _ = _translate(cfg, params, sources, sampling=sampling, seed=4)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  for source, t, s in zip(sources, a, a_scores):  # scores: the untempered model's
    np.testing.assert_allclose(s, recompute.log_prob(source, t), rtol=1e-4, atol=1e-4)


def test_translation_requests_are_checked(model_and_params):
  cfg, params, _ = model_and_params
  with pytest.raises(ValueError, match=r"source 1 is 24 tokens \+ the end token = 25, past"
                     " the model's 24 learned positions"):
    _translate(cfg, params, [np.array([3]), np.full(24, 3)])
  with pytest.raises(ValueError, match="max_new_tokens .30. exceeds the model's 24"):
    _translate(cfg, params, [np.array([3])], steps=30)
  with pytest.raises(ValueError, match="not both"):
    _translate(cfg, params, [np.array([3])], beam_size=2, sampling=Sampling(1.0))
  with pytest.raises(ValueError, match="source 0 must be a non-empty"):
    _translate(cfg, params, [np.array([], np.int32)])
  with pytest.raises(ValueError, match="translation needs an encoder-decoder"):
    seq2seq_decoding.translate_ids(model_config.tiny_gpt(), params, [np.array([3])],
                           max_new_tokens=4, start_id=0, eos_id=0)
  with pytest.raises(ValueError, match="use fusedlm translate"):
    generation.generate(cfg, params, [np.array([3])], max_new_tokens=4)


def test_experiment_configs_validate_and_shrink():
  for name in ("tiny_seq2seq", "translate_en_es"):
    for arg in ("", run_config.RUNLOCAL):
      config = load_experiment(name, arg)
      run_config.validate(config)
  config = load_experiment("translate_en_es")
  cfg = run_config.build_model_config(config, 16000)
  assert cfg.kind == "encoder_decoder" and cfg.num_layers == 6 and cfg.max_len == 64
  config.data.too_long = "never"
  with pytest.raises(ValueError, match="too_long must be one of"):
    run_config.validate(config)
  config = load_experiment("tiny_seq2seq")
  with config.unlocked():
    config.nsp = True
  with pytest.raises(ValueError, match="unknown top-level keys"):
    run_config.validate(config)


@pytest.mark.slow
def test_synthetic_task_is_learned_to_bleu_95(tmp_path, shared_cache_dir):
  """~400 steps of the tiny encoder-decoder, then fusedlm evaluate and
  fusedlm translate on the run: held-out BLEU >= 95."""
  config = load_experiment("tiny_seq2seq")
  config.data.cache_dir = shared_cache_dir
  config.data.seq_len = config.model.max_len = 24
  config.train.steps = 400
  config.train.eval_every = config.checkpoint.every = 400
  workdir = tmp_path / "run"
  summary = loop.train(config, workdir, progress=False)
  assert summary["eval"]["accuracy"] > 0.98
  result = eval_loop.evaluate_run(workdir, max_batches=2)  # 128 held-out pairs, greedy
  bleu = result["metrics"]["bleu"]
  assert bleu >= 95.0, result["metrics"]
  hypotheses = result["outputs"]["hypotheses"]
  assert len(hypotheses) == result["metrics"]["sources"] == 128
  _, validation = seq2seq.pairs_of(config)
  exact = np.mean([h == synthetic_translation.translate(s)
                   for h, s in zip(hypotheses, validation.sources[:128])])
  assert exact >= 0.9, exact
  # The command line: translations of a file with references, and its errors.
  sources = validation.sources[:8]
  (tmp_path / "in.txt").write_text("".join(s + "\n" for s in sources))
  (tmp_path / "ref.txt").write_text("".join(
      synthetic_translation.translate(s) + "\n" for s in sources))
  out = fusedlm("translate", "--workdir", workdir, "--input", tmp_path / "in.txt",
                "--reference", tmp_path / "ref.txt", "--output", tmp_path / "out.txt",
                "--beam_size", "3", "--json", tmp_path / "t.json")
  assert out.returncode == 0, out.stderr
  assert "BLEU" in out.stdout
  record = json.loads((tmp_path / "t.json").read_text())
  assert record["decoding"]["beam_size"] == 3
  assert record["scores"]["bleu"] >= 90.0
  assert len((tmp_path / "out.txt").read_text().splitlines()) == 8
  with pytest.raises(ValueError, match="3 references for 2 texts"):
    translate.run_translation(workdir, ["a", "b"], references=["x", "y", "z"])
