"""MLM masking statistics: 15% selected, 80/10/10 corruption, specials never selected."""

import numpy as np
import pytest

from fusedlm.research.data.masking import mask_sequence, select_positions, word_ids_from_starts

SEQ_LEN = 128
MASK_ID = 4
REPLACEMENTS = np.arange(5, 105, dtype=np.int32)  # 100 regular ids.


def sequence(rng):
  ids = rng.integers(5, 105, size=SEQ_LEN).astype(np.int32)
  ids[[0, 50, 100]] = [2, 3, 3]  # [CLS] ... [SEP] ... [SEP]
  ids[101:] = 0  # padding
  maskable = np.ones(SEQ_LEN, dtype=bool)
  maskable[[0, 50]] = False
  maskable[100:] = False
  return ids, maskable


def draws(count, **kwargs):
  rng = np.random.default_rng(0)
  for _ in range(count):
    ids, maskable = sequence(rng)
    yield ids, maskable, mask_sequence(ids, maskable, rng, mask_prob=0.15, mask_id=MASK_ID,
                                       replacement_ids=REPLACEMENTS, **kwargs)


def test_selection_and_corruption_rates_over_many_draws():
  selected = maskable_total = masked = randomized = kept = 0
  per_position = np.zeros(SEQ_LEN)
  for ids, maskable, out in draws(3000):
    chosen = out.weights > 0
    assert not (chosen & ~maskable).any(), "a special or padding token was selected"
    np.testing.assert_array_equal(out.input_ids[~chosen], ids[~chosen])
    np.testing.assert_array_equal(out.labels, np.where(chosen, ids, 0))
    selected += chosen.sum()
    maskable_total += maskable.sum()
    per_position += chosen
    masked += (out.input_ids[chosen] == MASK_ID).sum()
    changed = out.input_ids[chosen] != ids[chosen]
    randomized += (changed & (out.input_ids[chosen] != MASK_ID)).sum()
    kept += (~changed).sum()
  # Stochastic rounding makes the expected rate exactly 15%; ~52k selections.
  np.testing.assert_allclose(selected / maskable_total, 0.15, atol=0.002)
  np.testing.assert_allclose(masked / selected, 0.8, atol=0.01)
  # A random replacement equals the original with probability 1/100.
  np.testing.assert_allclose(randomized / selected, 0.1 * 0.99, atol=0.008)
  np.testing.assert_allclose(kept / selected, 0.1 + 0.1 * 0.01, atol=0.008)
  # No position is favoured: every maskable position is picked ~15% of the time.
  _, maskable = sequence(np.random.default_rng(0))
  np.testing.assert_allclose(per_position[maskable] / 3000, 0.15, atol=0.035)


def test_whole_word_masking_takes_words_whole_within_budget():
  rng = np.random.default_rng(1)
  starts = rng.random(SEQ_LEN) < 0.4
  word_ids = word_ids_from_starts(starts)
  for ids, maskable, out in draws(300, word_ids=word_ids):
    chosen = out.weights > 0
    assert not (chosen & ~maskable).any()
    for word in np.unique(word_ids[chosen]):
      in_word = (word_ids == word) & maskable
      np.testing.assert_array_equal(chosen[in_word], True)
    assert chosen.sum() <= np.floor(maskable.sum() * 0.15) + 1


def test_no_maskable_token_selects_nothing():
  rng = np.random.default_rng(0)
  assert len(select_positions(np.zeros(10, dtype=bool), rng, 0.15)) == 0


def test_word_ids_count_word_starts():
  np.testing.assert_array_equal(word_ids_from_starts([False, False, True, False, True]),
                                [0, 0, 1, 1, 2])


def test_same_generator_state_gives_the_same_masks():
  ids, maskable = sequence(np.random.default_rng(3))
  first, second = (mask_sequence(ids, maskable, np.random.default_rng(9), mask_prob=0.15,
                                 mask_id=MASK_ID, replacement_ids=REPLACEMENTS)
                   for _ in range(2))
  np.testing.assert_array_equal(first.input_ids, second.input_ids)
  assert not np.array_equal(first.input_ids, mask_sequence(
      ids, maskable, np.random.default_rng(10), mask_prob=0.15, mask_id=MASK_ID,
      replacement_ids=REPLACEMENTS).input_ids)


@pytest.mark.parametrize("prob", [0.05, 0.5])
def test_other_rates_are_honoured(prob):
  rng = np.random.default_rng(0)
  counts = [len(select_positions(np.ones(37, dtype=bool), rng, prob)) for _ in range(4000)]
  np.testing.assert_allclose(np.mean(counts) / 37, prob, atol=0.003)
