"""Sampling: greedy, temperature, top-k, top-p (nucleus), their order, bad settings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.research.inference.sampling import Sampling, sample, warp_logits

DRAWS = 20_000  # rows of one batched draw: a frequency's std is <= 0.0036
# One compile per setting instead of op-by-op dispatch of sort and top_k.
_sample = jax.jit(sample, static_argnames="sampling")


@functools.partial(jax.jit, static_argnames=("sampling", "draws"))
def _draws(logits, key, sampling, draws=DRAWS):  # logits [vocab] -> [draws] int32
  return sample(jnp.broadcast_to(logits, (draws, logits.shape[0])), key, sampling)


def _frequencies(tokens, vocab):
  return np.bincount(np.asarray(tokens), minlength=vocab) / len(tokens)


def _logits(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape) * 3.0


def test_greedy_is_argmax_and_ignores_the_key():
  logits = _logits(0, (16, 100))
  expected = np.argmax(logits, axis=-1)
  for seed in range(3):
    tokens = _sample(logits, jax.random.key(seed), Sampling())
    assert tokens.dtype == jnp.int32 and tokens.shape == (16,)
    np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
  logits = _logits(1, (64, 50))
  tokens = _sample(logits, jax.random.key(0), Sampling(temperature, top_k=1))
  np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


def test_top_k_draws_never_leave_the_k_largest():
  logits = _logits(2, (8, 40))
  k = 5
  keys = jax.random.split(jax.random.key(0), 500)
  draw = jax.jit(jax.vmap(lambda key: sample(logits, key, Sampling(2.0, top_k=k))))
  tokens = np.asarray(draw(keys))  # [500, 8]: 4000 draws
  allowed = np.argsort(-np.asarray(logits), axis=-1)[:, :k]  # [8, k]
  for row in range(8):
    drawn = set(tokens[:, row].tolist())
    assert drawn <= set(allowed[row].tolist()), row
    assert len(drawn) == k, row  # temperature 2 flattens: each of the k shows up


def test_top_k_larger_than_the_vocabulary_keeps_everything():
  logits = _logits(3, (2, 7))
  warped = warp_logits(logits, Sampling(1.0, top_k=100))
  np.testing.assert_allclose(warped, logits, rtol=1e-6)


# Probabilities 0.40, 0.25, 0.15, 0.10, 0.06, 0.04 in a shuffled order.
NUCLEUS_PROBS = np.array([0.10, 0.40, 0.04, 0.15, 0.06, 0.25])


@pytest.mark.parametrize("top_p, nucleus", [
    (0.3, [1]),  # the most probable alone already reaches 0.3
    (0.39, [1]),
    (0.5, [1, 5]),  # 0.40 < 0.5 <= 0.65
    (0.7, [1, 5, 3]),  # 0.65 < 0.7 <= 0.80
    (0.85, [1, 5, 3, 0]),  # 0.80 < 0.85 <= 0.90
    (0.99, [1, 5, 3, 0, 4, 2]),  # 0.96 < 0.99
    (0.01, [1]),  # the most probable is always kept
])
def test_top_p_keeps_exactly_the_minimal_nucleus(top_p, nucleus):
  logits = jnp.log(jnp.asarray(NUCLEUS_PROBS, jnp.float32))
  warped = np.asarray(warp_logits(logits[None], Sampling(1.0, top_p=top_p)))[0]
  assert sorted(np.flatnonzero(np.isfinite(warped))) == sorted(nucleus)
  tokens = _draws(logits, jax.random.key(0), Sampling(1.0, top_p=top_p))
  freq = _frequencies(tokens, len(NUCLEUS_PROBS))
  expected = np.zeros_like(NUCLEUS_PROBS)
  expected[nucleus] = NUCLEUS_PROBS[nucleus] / NUCLEUS_PROBS[nucleus].sum()
  np.testing.assert_allclose(freq, expected, atol=0.015)


def test_top_k_filters_before_top_p():
  # probs 0.5, 0.3, 0.2. top-k 2 renormalises to 0.625, 0.375, so top_p 0.6 keeps
  # token 0 alone; top-p first would have kept tokens 0 and 1 (0.5 < 0.6).
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  warped = np.asarray(warp_logits(logits, Sampling(1.0, top_k=2, top_p=0.6)))
  np.testing.assert_array_equal(np.isfinite(warped), [[True, False, False]])


def test_temperature_scales_before_top_p():
  # probs 0.5, 0.3, 0.2: top_p 0.55 keeps two tokens at T=1; at T=0.25 the top one
  # holds 0.5^4 / (0.5^4 + 0.3^4 + 0.2^4) = 0.87 alone.
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  at = lambda t: np.isfinite(np.asarray(warp_logits(logits, Sampling(t, top_p=0.55))))
  np.testing.assert_array_equal(at(1.0), [[True, True, False]])
  np.testing.assert_array_equal(at(0.25), [[True, False, False]])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_softmax_of_logits_over_temperature(temperature):
  logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0])
  tokens = _draws(logits, jax.random.key(1), Sampling(temperature))
  expected = np.asarray(jax.nn.softmax(logits / temperature))
  # ~4 standard deviations of a frequency estimated from DRAWS draws.
  np.testing.assert_allclose(_frequencies(tokens, 5), expected, atol=0.015)


def test_same_key_same_tokens_and_another_key_others():
  logits = _logits(4, (32, 100))
  sampling = Sampling(1.0, top_k=50, top_p=0.9)
  first = _sample(logits, jax.random.key(7), sampling)
  np.testing.assert_array_equal(first, _sample(logits, jax.random.key(7), sampling))
  assert (first != _sample(logits, jax.random.key(8), sampling)).any()


def test_sampling_is_hashable_and_normalised():
  assert Sampling(1, 3, 1) == Sampling(1.0, 3, 1.0)
  assert hash(Sampling(1, 3, 1)) == hash(Sampling(1.0, 3, 1.0))
  assert isinstance(Sampling(np.float32(0.5), np.int64(2)).top_k, int)
  assert Sampling().greedy and not Sampling(0.7).greedy
  assert Sampling().describe() == "greedy"
  assert Sampling(0.7, 40, 0.9).describe() == "temperature 0.7, top_k 40, top_p 0.9"


@pytest.mark.parametrize("changes, message", [
    ({"temperature": -0.5}, "temperature must be >= 0.*-0.5"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a finite number.*'hot'"),
    ({"top_k": -1}, "top_k must be >= 0.*-1"),
    ({"top_k": 2.5}, "top_k must be an int.*2.5"),
    ({"top_k": True}, "top_k must be an int.*True"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\].*0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\].*1.5"),
])
def test_bad_settings_raise_naming_the_field(changes, message):
  with pytest.raises(ValueError, match=message):
    Sampling(**changes)


def test_warp_logits_refuses_greedy_settings():
  with pytest.raises(ValueError, match="temperature > 0"):
    warp_logits(jnp.zeros((1, 3)), Sampling())
