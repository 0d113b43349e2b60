"""The Markov source: exact stationary distribution and entropy rate, and its samples."""

import numpy as np
import pytest

from fusedlm.research.data.synthetic import (
    MarkovSource,
    SyntheticSpec,
    random_markov_source,
    synthetic_corpus,
)


def binary_entropy(p):
  return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def test_two_state_chain_matches_closed_form():
  a, b = 0.3, 0.1  # P(0 -> 1), P(1 -> 0)
  source = MarkovSource("xy", np.array([[1 - a, a], [b, 1 - b]]))
  pi = np.array([b, a]) / (a + b)
  np.testing.assert_allclose(source.stationary_distribution(), pi, rtol=1e-12)
  expected = pi[0] * binary_entropy(a) + pi[1] * binary_entropy(b)
  np.testing.assert_allclose(source.entropy_rate(), expected, rtol=1e-12)


def test_uniform_iid_and_deterministic_chains():
  k = 7
  uniform = MarkovSource("abcdefg", np.full((k, k), 1 / k))
  np.testing.assert_allclose(uniform.entropy_rate(), np.log(k), rtol=1e-12)
  row = np.array([0.5, 0.25, 0.125, 0.125])
  iid = MarkovSource("abcd", np.tile(row, (4, 1)))
  np.testing.assert_allclose(iid.entropy_rate(), -(row * np.log(row)).sum(), rtol=1e-12)
  cycle = MarkovSource("abc", np.roll(np.eye(3), 1, axis=1))
  np.testing.assert_allclose(cycle.stationary_distribution(), np.full(3, 1 / 3), rtol=1e-12)
  np.testing.assert_allclose(cycle.entropy_rate(), 0.0, atol=1e-15)


def test_random_source_is_stationary_and_below_uniform_entropy():
  source = random_markov_source(alphabet_size=12, concentration=0.3, seed=3)
  pi = source.stationary_distribution()
  np.testing.assert_allclose(pi @ source.transitions, pi, atol=1e-12)
  np.testing.assert_allclose(pi.sum(), 1.0, rtol=1e-12)
  assert 0.3 * np.log(12) < source.entropy_rate() < np.log(12)


def test_samples_reproduce_the_entropy_rate_and_stationary_marginal():
  source = random_markov_source(alphabet_size=8, concentration=0.5, seed=1)
  codes = source.sample_codes(400, 1000, np.random.default_rng(0))
  pairs = np.zeros((8, 8))
  np.add.at(pairs, (codes[:, :-1].ravel(), codes[:, 1:].ravel()), 1)
  conditional = pairs / pairs.sum(axis=1, keepdims=True)
  weights = pairs.sum(axis=1) / pairs.sum()
  with np.errstate(divide="ignore", invalid="ignore"):
    plug_in = -np.nansum(weights[:, None] * conditional * np.log(conditional))
  # 400k transitions: the plug-in estimate is within ~0.005 nats.
  np.testing.assert_allclose(plug_in, source.entropy_rate(), atol=0.01)
  first = np.bincount(codes[:, 0], minlength=8) / 400
  np.testing.assert_allclose(first, source.stationary_distribution(), atol=0.08)


def test_corpus_is_reproducible_and_uses_the_alphabet():
  spec = SyntheticSpec(alphabet_size=5, num_train_docs=20, num_validation_docs=4, doc_len=50)
  corpus, source = synthetic_corpus(spec)
  again, _ = synthetic_corpus(spec)
  assert corpus.fingerprint == again.fingerprint
  assert len(corpus.train) == 20 and len(corpus.validation) == 4
  assert {len(doc) for doc in corpus.train + corpus.validation} == {50}
  assert set("".join(corpus.train)) <= set(source.alphabet) == set("abcde")
  assert not set(corpus.train) & set(corpus.validation)
  other, _ = synthetic_corpus(SyntheticSpec(alphabet_size=5, num_train_docs=20,
                                            num_validation_docs=4, doc_len=50, seed=1))
  assert other.fingerprint != corpus.fingerprint


def test_one_character_is_one_byte_token(byte_level):
  corpus, _ = synthetic_corpus(SyntheticSpec(num_train_docs=3, num_validation_docs=1,
                                             doc_len=64))
  ids = byte_level.encode_batch(corpus.train)
  assert [len(i) for i in ids] == [64, 64, 64]
  assert byte_level.decode(ids[0]) == corpus.train[0]


@pytest.mark.parametrize("alphabet, transitions, message", [
    ("ab", [[0.5, 0.4], [0.5, 0.5]], "probability distribution"),
    ("ab", [[1.0, 0.0, 0.0]] * 2, r"\[2, 2\]"),
    ("aa", [[0.5, 0.5]] * 2, "distinct"),
    ("ab", [[1.0, 0.0], [0.0, 1.0]], "reducible"),
])
def test_bad_chains_are_rejected(alphabet, transitions, message):
  with pytest.raises(ValueError, match=message):
    MarkovSource(alphabet, np.array(transitions)).stationary_distribution()
