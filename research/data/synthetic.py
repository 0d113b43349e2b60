"""A synthetic corpus with a known entropy rate, to tell whether a model learns.

Text is drawn from a first-order Markov chain over a small ASCII alphabet. Each
document starts from the chain's stationary distribution, so every position is
distributed alike and the conditional entropy of a character given the previous
one is exactly the chain's entropy rate

    H = -sum_i pi_i sum_j P_ij log P_ij        (nats per character),

with pi the stationary distribution of the transition matrix P. No model can
predict a character better on average, and a model that has learned the chain
reaches it.

Units: the alphabet is ASCII letters, one byte each, so under the "byte"
tokenizer (`research.data.tokenizer`) one character is one token and H is the
entropy in nats per token. Under WordPiece or BPE tokens merge characters and H
is no longer per token.

What a causal-LM validation loss should approach: `causal.CausalLMBatches`
appends an end-of-text token to every document and masks the target across a
document boundary, so the first character of a document is never a target and
each document of L characters yields L-1 character targets (each at best H) and
one end-of-text target. Predicting that token with probability 1/L at every
step costs at most (1 + log L)/L nats per target on average, and predicting it
perfectly gains at most H/L, so the best achievable mean validation loss lies in
[H - H/L, H + (1 + log L)/L]; `SyntheticSpec.doc_len` = 1024 makes both margins
smaller than 0.008 nats.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from fusedlm.research.data.corpus import Corpus

ALPHABET = string.ascii_lowercase + string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class MarkovSource:
  """A first-order Markov chain over `alphabet`.

  Attributes:
    alphabet: K distinct single-byte characters; symbol i is alphabet[i].
    transitions: float64 [K, K]; row i is P(next symbol | current symbol i).
  """

  alphabet: str
  transitions: np.ndarray

  def __post_init__(self):
    transitions = np.asarray(self.transitions, dtype=np.float64)
    size = len(self.alphabet)
    if size < 2 or len(set(self.alphabet)) != size or not self.alphabet.isascii():
      raise ValueError(f"alphabet must hold at least 2 distinct ASCII characters, "
                       f"got {self.alphabet!r}")
    if transitions.shape != (size, size):
      raise ValueError(f"transitions must be [{size}, {size}], got {transitions.shape}")
    if (transitions < 0).any() or not np.allclose(transitions.sum(axis=1), 1.0, atol=1e-9):
      raise ValueError("every transition row must be a probability distribution")
    object.__setattr__(self, "transitions", transitions)

  def stationary_distribution(self) -> np.ndarray:
    """pi with pi P = pi and sum(pi) = 1, float64 [K].

    Raises:
      ValueError: the chain has no unique stationary distribution (reducible).
    """
    size = len(self.alphabet)
    # Solve (P^T - I) pi = 0 together with sum(pi) = 1 as one least-squares system.
    system = np.vstack([self.transitions.T - np.eye(size), np.ones((1, size))])
    target = np.zeros(size + 1)
    target[-1] = 1.0
    pi, _, rank, _ = np.linalg.lstsq(system, target, rcond=None)
    if rank < size:
      raise ValueError("the chain is reducible: its stationary distribution is not unique")
    return pi

  def entropy_rate(self) -> float:
    """H = -sum_i pi_i sum_j P_ij log P_ij, in nats per character (0 log 0 = 0)."""
    p = self.transitions
    row_entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return float(self.stationary_distribution() @ row_entropy)

  def sample(self, num_docs: int, doc_len: int, rng: np.random.Generator) -> list[str]:
    """`num_docs` documents of `doc_len` characters, each started from pi."""
    codes = self.sample_codes(num_docs, doc_len, rng)
    letters = np.frombuffer(self.alphabet.encode("ascii"), dtype=np.uint8)
    return [letters[row].tobytes().decode("ascii") for row in codes]

  def sample_codes(self, num_docs: int, doc_len: int, rng: np.random.Generator) -> np.ndarray:
    """Symbol indices, int64 [num_docs, doc_len]; documents are sampled in parallel."""
    if num_docs < 1 or doc_len < 1:
      raise ValueError(f"need num_docs >= 1 and doc_len >= 1, got {num_docs}, {doc_len}")
    cumulative = np.cumsum(self.transitions, axis=1)
    cumulative[:, -1] = 1.0  # Rounding must not leave a gap above the last bin.
    codes = np.empty((num_docs, doc_len), dtype=np.int64)
    codes[:, 0] = rng.choice(len(self.alphabet), size=num_docs,
                             p=self.stationary_distribution())
    uniforms = rng.random((num_docs, doc_len))
    for t in range(1, doc_len):
      # Inverse-CDF draw: the first bin whose cumulative probability exceeds u.
      codes[:, t] = (cumulative[codes[:, t - 1]] <= uniforms[:, t, None]).sum(axis=1)
    return codes


def random_markov_source(alphabet_size: int = 16, concentration: float = 0.3,
                         seed: int = 0) -> MarkovSource:
  """A chain whose transition rows are Dirichlet(concentration) draws.

  Smaller concentrations give peakier rows, so the entropy rate sits well below
  the log(alphabet_size) of uniform text and a model has something to learn.
  """
  if not 2 <= alphabet_size <= len(ALPHABET):
    raise ValueError(f"alphabet_size must be in [2, {len(ALPHABET)}], got {alphabet_size}")
  if concentration <= 0:
    raise ValueError(f"concentration must be positive, got {concentration}")
  rng = np.random.default_rng([seed, 0])
  transitions = rng.dirichlet(np.full(alphabet_size, concentration), size=alphabet_size)
  return MarkovSource(ALPHABET[:alphabet_size], transitions)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Everything that determines a synthetic corpus."""

  alphabet_size: int = 16
  concentration: float = 0.3
  num_train_docs: int = 2048
  num_validation_docs: int = 128
  doc_len: int = 1024
  seed: int = 0


def synthetic_corpus(spec: SyntheticSpec = SyntheticSpec()) -> tuple[Corpus, MarkovSource]:
  """A Markov-chain corpus and its source; train and validation use separate streams."""
  source = random_markov_source(spec.alphabet_size, spec.concentration, spec.seed)
  train = source.sample(spec.num_train_docs, spec.doc_len,
                        np.random.default_rng([spec.seed, 1]))
  validation = source.sample(spec.num_validation_docs, spec.doc_len,
                             np.random.default_rng([spec.seed, 2]))
  name = (f"synthetic-markov-k{spec.alphabet_size}-c{spec.concentration:g}"
          f"-l{spec.doc_len}-s{spec.seed}")
  description = (f"first-order Markov chain over {source.alphabet!r}, entropy rate "
                 f"{source.entropy_rate():.6f} nats/character; "
                 f"{spec.num_train_docs} train and {spec.num_validation_docs} validation "
                 f"documents of {spec.doc_len} characters")
  return Corpus(name=name, train=train, validation=validation, description=description), source
