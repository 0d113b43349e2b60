"""Causal-LM packing: coverage, segment and position ids, loss mask, order, sharding."""

import numpy as np
import pytest

from fusedlm.research.data.causal import CausalLMBatches
from fusedlm.research.data.tokenizer import Tokenizer
from tests.research.data.token_data import explicit_stream, split_of

LENGTHS = [40, 3, 17, 1, 60, 25, 9, 33, 12, 50, 5, 28]  # 283 tokens, 12 documents.


@pytest.fixture
def split():
  return split_of(LENGTHS)


def maker(split, tokenizer, **kwargs):
  options = dict(seq_len=16, batch_size=4, seed=0) | kwargs
  return CausalLMBatches(split, tokenizer, **options)


def test_one_epoch_uses_every_window_once_and_every_token_once(split, byte_level):
  batches = maker(split, byte_level, batch_size=6)
  ids, _, _ = explicit_stream(split, byte_level.eos_id)
  assert batches.num_windows == (len(ids) - 1) // 16 == 18
  assert batches.steps_per_epoch == 3
  window_of = {ids[s:s + 16].tobytes(): s // 16 for s in range(0, 18 * 16, 16)}
  seen = []
  for step in range(3):
    batch = batches.batch(step)
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      window = window_of[inputs.astype(ids.dtype).tobytes()]
      np.testing.assert_array_equal(targets, ids[window * 16 + 1:window * 16 + 17])
      seen.append(window)
  assert sorted(seen) == list(range(18))
  # So the inputs of one epoch, put back in stream order, are the stream itself.
  inputs = np.concatenate([batches.batch(s)["inputs"] for s in range(3)])
  np.testing.assert_array_equal(inputs[np.argsort(seen)].ravel(), ids[:18 * 16])


def test_segments_positions_and_loss_mask_follow_documents(split, byte_level):
  ids, doc, offset = explicit_stream(split, byte_level.eos_id)
  batches = maker(split, byte_level)
  window = 2  # Starts inside document 0 ([0, 40) + eos), ends in document 1.
  batch = batches._windows(np.array([window]), np.ones(1, dtype=np.float32))
  start = window * 16
  input_doc, target_doc = doc[start:start + 16], doc[start + 1:start + 17]
  np.testing.assert_array_equal(batch["segment_ids"][0], input_doc - input_doc[0] + 1)
  expected_positions = np.where(input_doc == input_doc[0], offset[start:start + 16] -
                                offset[start], offset[start:start + 16])
  np.testing.assert_array_equal(batch["positions"][0], expected_positions)
  np.testing.assert_array_equal(batch["loss_mask"][0], (input_doc == target_doc).astype(float))
  # The eos ending document 0 is a target; the first token of document 1 is not.
  eos_at = 40 - start
  assert batch["targets"][0, eos_at - 1] == byte_level.eos_id
  np.testing.assert_array_equal(batch["loss_mask"][0, eos_at - 1:eos_at + 1], [1.0, 0.0])


def test_batch_arrays_have_the_documented_shapes_and_types(split, byte_level):
  batch = maker(split, byte_level).batch(0)
  for key in ("inputs", "targets", "segment_ids", "positions"):
    assert batch[key].shape == (4, 16) and batch[key].dtype == np.int32
  assert batch["loss_mask"].dtype == np.float32 and batch["weights"].shape == (4,)
  assert batch["positions"].max() < 16 and batch["segment_ids"].min() == 1


def test_resuming_at_step_i_gives_batch_i_and_epochs_reshuffle(split, byte_level):
  run = maker(split, byte_level, seed=5)
  history = [run.batch(step) for step in range(9)]
  resumed = maker(split, byte_level, seed=5)
  for step in (8, 3, 6):
    for key, value in resumed.batch(step).items():
      np.testing.assert_array_equal(value, history[step][key])
  first_epoch = np.concatenate([b["inputs"] for b in history[:4]])
  second_epoch = np.concatenate([b["inputs"] for b in history[4:8]])
  assert not np.array_equal(first_epoch, second_epoch)
  other_seed = maker(split, byte_level, seed=6).batch(0)
  assert not np.array_equal(history[0]["inputs"], other_seed["inputs"])


def test_each_process_gets_its_rows_of_the_global_batch(split, byte_level):
  whole = maker(split, byte_level).batch(2)
  halves = [maker(split, byte_level, process_index=p, process_count=2).batch(2)
            for p in range(2)]
  for key, value in whole.items():
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)
  assert halves[0]["inputs"].shape == (2, 16)


def test_evaluation_predicts_every_token_once_and_pads_rows(split, byte_level):
  batches = list(maker(split, byte_level).eval_batches())
  ids, _, _ = explicit_stream(split, byte_level.eos_id)
  assert len(batches) == 5  # ceil(ceil(294 / 16) / 4) = ceil(19 / 4)
  # Each document's tokens after the first, plus its eos, are targets once.
  np.testing.assert_allclose(sum(b["loss_mask"].sum() for b in batches), sum(LENGTHS))
  last = batches[-1]
  np.testing.assert_array_equal(last["weights"], [1.0, 1.0, 1.0, 0.0])
  assert last["loss_mask"][3].sum() == 0
  tail = last["loss_mask"][2]
  assert 0 < tail.sum() < 16 and (last["segment_ids"][2][tail == 0][-1] == 0)
  assert len(list(maker(split, byte_level).eval_batches(max_batches=2))) == 2


def test_too_short_sequence_and_missing_separator_are_rejected(split, byte_level, bpe):
  with pytest.raises(ValueError, match="seq_len must be at least 2.*got 1"):
    maker(split, byte_level, seq_len=1)
  bare = Tokenizer(bpe.hf, "bpe", roles={})
  with pytest.raises(ValueError, match="neither an end-of-text nor a \\[SEP\\]"):
    maker(split, bare)
  with pytest.raises(ValueError, match="fewer than one training batch"):
    maker(split, byte_level, batch_size=32).steps_per_epoch
