"""BERT's masked-language-model corruption of one sequence, as a pure function.

Selection: of the n maskable positions (real, non-special tokens), k = floor(n *
mask_prob + u) with u ~ U[0, 1) are selected uniformly at random. The stochastic
rounding makes the expected share exactly mask_prob for any length (BERT's
round() overshoots short sequences). Special tokens are never selected.

Whole-word masking selects words instead: words are visited in random order and
taken whole while the total stays within k (a word that would overflow is
skipped, as in BERT's create_pretraining_data), so a word is never partly masked.

Corruption of each selected position: 80% [MASK], 10% a token drawn uniformly
from the non-special vocabulary (which can be the original token), 10% unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class MaskedSequence:
  """One corrupted sequence; arrays [seq_len].

  Attributes:
    input_ids: int32 ids after corruption.
    labels: int32 original id at selected positions, 0 elsewhere.
    weights: float32 1.0 at selected positions, 0.0 elsewhere.
  """

  input_ids: np.ndarray
  labels: np.ndarray
  weights: np.ndarray


def select_positions(maskable: np.ndarray, rng: np.random.Generator, mask_prob: float,
                     word_ids: np.ndarray | None = None) -> np.ndarray:
  """Sorted int64 indices of the selected positions.

  Args:
    maskable: bool [seq_len], True where a token may be selected.
    rng: the only source of randomness.
    mask_prob: expected share of maskable positions selected.
    word_ids: int [seq_len], non-decreasing, equal for positions of one word
      (whole-word masking; see `word_ids_from_starts`); None selects tokens
      independently.
  """
  candidates = np.flatnonzero(maskable)
  budget = int(np.floor(len(candidates) * mask_prob + rng.random()))
  if budget == 0:
    return np.zeros(0, dtype=np.int64)
  if word_ids is None:
    return np.sort(rng.permutation(candidates)[:budget])
  # word_ids never decrease, so each word's candidates are one contiguous run.
  words, first, sizes = np.unique(word_ids[candidates], return_index=True, return_counts=True)
  chosen = []
  total = 0
  for word in rng.permutation(len(words)):
    if total + sizes[word] > budget:
      continue
    chosen.append(candidates[first[word]:first[word] + sizes[word]])
    total += sizes[word]
    if total == budget:
      break
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def mask_sequence(input_ids: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, *,
                  mask_prob: float, mask_id: int, replacement_ids: np.ndarray,
                  word_ids: np.ndarray | None = None) -> MaskedSequence:
  """Selects positions (`select_positions`) and corrupts them 80/10/10.

  Args:
    input_ids: int [seq_len] original ids.
    maskable: bool [seq_len].
    rng: the only source of randomness.
    mask_prob: expected share of maskable positions selected.
    mask_id: id of [MASK].
    replacement_ids: int [n] ids that random replacement draws from.
    word_ids: see `select_positions`.
  """
  selected = select_positions(maskable, rng, mask_prob, word_ids)
  draw = rng.random(len(selected))
  random_tokens = replacement_ids[rng.integers(len(replacement_ids), size=len(selected))]
  corrupted = np.array(input_ids, dtype=np.int32)
  originals = corrupted[selected]
  corrupted[selected] = np.where(
      draw < MASK_FRACTION, mask_id,
      np.where(draw < MASK_FRACTION + RANDOM_FRACTION, random_tokens, originals))
  labels = np.zeros(len(corrupted), dtype=np.int32)
  labels[selected] = originals
  weights = np.zeros(len(corrupted), dtype=np.float32)
  weights[selected] = 1.0
  return MaskedSequence(input_ids=corrupted, labels=labels, weights=weights)


def word_ids_from_starts(word_starts: np.ndarray) -> np.ndarray:
  """int64 [seq_len] word index of each position from bool word-start flags."""
  starts = np.asarray(word_starts, dtype=bool).copy()
  if len(starts):
    starts[0] = True
  return np.cumsum(starts) - 1
