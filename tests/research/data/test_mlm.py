"""MLM + NSP batches: layout, NSP pairs and balance, masking in batches, packing, order."""

import numpy as np
import pytest

from fusedlm.research.data.cache import TokenizedSplit
from fusedlm.research.data.mlm import MLMBatches
from tests.research.data.token_data import explicit_stream

LENGTHS = [30, 50, 8, 70, 45, 12, 90, 33, 1, 64]
SPAN = 20  # Document d uses ids [5 + SPAN * d, 5 + SPAN * (d + 1)): ids name their document.


@pytest.fixture
def split():
  rng = np.random.default_rng(0)
  return TokenizedSplit.from_documents(
      [rng.integers(5 + SPAN * d, 5 + SPAN * (d + 1), size=n) for d, n in enumerate(LENGTHS)])


def maker(split, tokenizer, **kwargs):
  options = dict(seq_len=32, batch_size=8, seed=0) | kwargs
  return MLMBatches(split, tokenizer, **options)


def originals(batch):
  """Token ids before corruption."""
  return np.where(batch["mlm_weights"] > 0, batch["mlm_labels"], batch["input_ids"])


def contains(haystack, needle):
  return any(np.array_equal(haystack[i:i + len(needle)], needle)
             for i in range(len(haystack) - len(needle) + 1))


def test_rows_are_cls_a_sep_b_sep_with_token_types_and_padding(split, wordpiece):
  batch = maker(split, wordpiece).batch(0)
  assert batch["input_ids"].shape == (8, 32) and batch["nsp_labels"].shape == (8,)
  assert batch["padding_mask"].dtype == bool and batch["mlm_weights"].dtype == np.float32
  for row, ids in enumerate(originals(batch)):
    n = batch["padding_mask"][row].sum()
    np.testing.assert_array_equal(batch["padding_mask"][row], np.arange(32) < n)
    seps = np.flatnonzero(ids[:n] == wordpiece.sep_id)
    assert ids[0] == wordpiece.cls_id and len(seps) == 2 and seps[1] == n - 1
    expected_types = (np.arange(32) > seps[0]) & (np.arange(32) < n)
    np.testing.assert_array_equal(batch["token_type_ids"][row], expected_types)
    np.testing.assert_array_equal(batch["input_ids"][row, n:], wordpiece.pad_id)


def test_true_pairs_continue_a_and_random_pairs_come_from_another_document(split, wordpiece):
  batches = maker(split, wordpiece)
  docs = [np.asarray(split.document(d)) for d in range(split.num_docs)]
  labels = []
  for step in range(6):
    batch = batches.batch(step)
    for row, ids in enumerate(originals(batch)):
      n = batch["padding_mask"][row].sum()
      seps = np.flatnonzero(ids[:n] == wordpiece.sep_id)
      a, b = ids[1:seps[0]], ids[seps[0] + 1:n - 1]
      doc_a = set((a - 5) // SPAN)
      doc_b = set((b - 5) // SPAN)
      assert len(doc_a) == len(doc_b) == 1
      if batch["nsp_labels"][row] == 0:
        assert doc_a == doc_b and contains(docs[doc_a.pop()], np.concatenate([a, b]))
      else:
        assert doc_a != doc_b and contains(docs[doc_b.pop()], b)
      labels.append(batch["nsp_labels"][row])
  assert 0 < np.mean(labels) < 1


def test_nsp_labels_are_balanced(split, wordpiece):
  batches = maker(split, wordpiece, batch_size=16)
  labels = np.concatenate([batches.batch(step)["nsp_labels"] for step in range(60)])
  # 960 draws: sd of the mean is 0.016.
  np.testing.assert_allclose(labels.mean(), 0.5, atol=0.06)


def test_batches_select_15_percent_and_never_special_tokens(split, wordpiece):
  batches = maker(split, wordpiece, batch_size=16)
  selected = maskable = 0
  for step in range(40):
    batch = batches.batch(step)
    ids = originals(batch)
    special = np.isin(ids, list(wordpiece.special_ids)) | ~batch["padding_mask"]
    assert (batch["mlm_weights"][special] == 0).all()
    np.testing.assert_array_equal(batch["input_ids"][special], ids[special])
    selected += batch["mlm_weights"].sum()
    maskable += (~special).sum()
  np.testing.assert_allclose(selected / maskable, 0.15, atol=0.015)


@pytest.mark.parametrize("nsp, whole_words, mask_prob", [
    (True, False, 0.15), (False, False, 0.15), (True, True, 0.15), (False, False, 0.5)])
def test_mlm_positions_list_every_selected_position(english_docs, wordpiece, nsp,
                                                    whole_words, mask_prob):
  split = TokenizedSplit.from_documents(wordpiece.encode_batch(english_docs[:20]))
  batches = maker(split, wordpiece, seq_len=40, nsp=nsp, whole_word_masking=whole_words,
                  mask_prob=mask_prob, batch_size=16)
  specials = 3 if nsp else 2
  assert batches.max_predictions == int((40 - specials) * mask_prob) + 1
  fullest = 0
  for batch in [batches.batch(step) for step in range(8)] + list(batches.eval_batches(2)):
    positions = batch["mlm_positions"]
    assert positions.shape == (16, batches.max_predictions) and positions.dtype == np.int32
    for row in range(16):
      selected = np.flatnonzero(batch["mlm_weights"][row])
      n = len(selected)
      np.testing.assert_array_equal(positions[row, :n], selected)
      np.testing.assert_array_equal(positions[row, n:], 40)  # empty slots
      fullest = max(fullest, n)
  # The bound is (nearly) reached: it is tight unless (seq_len - specials) *
  # mask_prob is an integer, so the gather saves what it can.
  assert fullest >= batches.max_predictions - 1 or whole_words


def test_whole_word_masking_on_real_text(english_docs, wordpiece):
  split = TokenizedSplit.from_documents(wordpiece.encode_batch(english_docs[:20]))
  batches = maker(split, wordpiece, seq_len=64, whole_word_masking=True)
  for step in range(5):
    batch = batches.batch(step)
    for row, ids in enumerate(originals(batch)):
      starts = wordpiece.word_start_table[ids].copy()
      starts[1:] |= np.isin(ids[:-1], list(wordpiece.special_ids))
      word = np.cumsum(starts)
      chosen = batch["mlm_weights"][row] > 0
      for w in np.unique(word[chosen]):
        np.testing.assert_array_equal(chosen[word == w], True)


def test_without_nsp_the_sep_joined_stream_is_packed_in_order(split, wordpiece):
  batches = maker(split, wordpiece, nsp=False)
  stream, _, _ = explicit_stream(split, wordpiece.sep_id)
  pieces = []
  for batch in batches.eval_batches():
    assert "nsp_labels" not in batch
    assert (batch["token_type_ids"] == 0).all()
    for row, ids in enumerate(originals(batch)):
      if batch["weights"][row] == 0:
        assert batch["mlm_weights"][row].sum() == 0
        continue
      n = batch["padding_mask"][row].sum()
      assert ids[0] == wordpiece.cls_id and ids[n - 1] == wordpiece.sep_id
      # A full window got a closing [SEP] added; a window ending a document has its own.
      pieces.append(ids[1:n - 1] if n == 32 else ids[1:n])
  np.testing.assert_array_equal(np.concatenate(pieces), stream)


def test_resume_and_sharding_reproduce_the_same_rows(split, wordpiece):
  history = [maker(split, wordpiece, seed=3).batch(step) for step in range(12)]
  fresh = maker(split, wordpiece, seed=3)
  halves = [maker(split, wordpiece, seed=3, process_index=p, process_count=2)
            for p in range(2)]
  for step in (11, 4):
    for key, value in fresh.batch(step).items():
      np.testing.assert_array_equal(value, history[step][key])
      np.testing.assert_array_equal(
          np.concatenate([h.batch(step)[key] for h in halves]), value)
  other_seed = maker(split, wordpiece, seed=4).batch(0)
  assert not np.array_equal(other_seed["input_ids"], history[0]["input_ids"])


def test_evaluation_is_repeatable_and_covers_every_chunk_once(split, wordpiece):
  batches = maker(split, wordpiece)
  first, second = list(batches.eval_batches()), list(batches.eval_batches())
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  weights = np.concatenate([b["weights"] for b in first])
  assert weights.sum() == batches.num_examples and len(weights) % 8 == 0


def test_requirements_are_checked(split, wordpiece, bpe):
  with pytest.raises(ValueError, match="no cls, sep, mask token"):
    maker(split, bpe)
  with pytest.raises(ValueError, match="seq_len 4 is too short for MLM with NSP"):
    maker(split, wordpiece, seq_len=4)
  with pytest.raises(ValueError, match="seq_len 2 is too short for MLM without NSP"):
    maker(split, wordpiece, seq_len=2, nsp=False)
  with pytest.raises(ValueError, match="NSP needs at least two non-empty documents"):
    maker(TokenizedSplit.from_documents([np.arange(10, 50)]), wordpiece)
  with pytest.raises(ValueError, match="mask_prob"):
    maker(split, wordpiece, mask_prob=0.0)
