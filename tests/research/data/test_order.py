"""Batch order: pure in (seed, step), reshuffled per epoch, sharded across processes."""

import numpy as np
import pytest

from fusedlm.research.data.order import BatchSchedule


def test_each_epoch_is_a_fresh_permutation_of_all_full_batches():
  schedule = BatchSchedule(num_examples=103, batch_size=10, seed=7)
  assert schedule.steps_per_epoch == 10
  epochs = [np.concatenate([schedule.train_examples(e * 10 + s) for s in range(10)])
            for e in range(2)]
  for epoch in epochs:
    assert len(np.unique(epoch)) == 100 and epoch.max() < 103
  assert not np.array_equal(epochs[0], epochs[1])


def test_examples_are_a_pure_function_of_seed_and_step():
  a = BatchSchedule(50, 5, seed=1)
  b = BatchSchedule(50, 5, seed=1)
  np.testing.assert_array_equal(a.train_examples(37), b.train_examples(37))
  other_seed = BatchSchedule(50, 5, seed=2)
  assert not np.array_equal(a.train_examples(37), other_seed.train_examples(37))


def test_processes_split_each_batch_in_order():
  whole = BatchSchedule(64, 8, seed=3)
  parts = [BatchSchedule(64, 8, seed=3, process_index=p, process_count=4) for p in range(4)]
  for step in (0, 5, 9):
    np.testing.assert_array_equal(
        np.concatenate([part.train_examples(step) for part in parts]),
        whole.train_examples(step))
  assert parts[2].per_process == 2


def test_eval_walks_in_order_and_pads_the_last_batch():
  schedule = BatchSchedule(10, 4, seed=0, process_index=1, process_count=2)
  assert schedule.num_eval_batches == 3
  examples, weights = schedule.eval_examples(2)
  np.testing.assert_array_equal(examples, [0, 0])  # Rows 10, 11 do not exist.
  np.testing.assert_array_equal(weights, [0.0, 0.0])
  np.testing.assert_array_equal(schedule.eval_examples(1)[0], [6, 7])


def test_evaluation_works_with_fewer_examples_than_a_batch():
  schedule = BatchSchedule(3, 8, seed=0)
  np.testing.assert_array_equal(schedule.eval_examples(0)[1], [1, 1, 1, 0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="only 3 examples, fewer than one training batch of 8"):
    schedule.train_examples(0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=10, process_count=3), "10 is not divisible by process_count 3"),
    (dict(batch_size=8, process_index=2, process_count=2), "process_index 2"),
    (dict(batch_size=0), "batch_size must be positive"),
])
def test_bad_sharding_is_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    BatchSchedule(num_examples=100, seed=0, **kwargs)


def test_negative_step_is_rejected():
  with pytest.raises(ValueError, match="-1"):
    BatchSchedule(10, 2, seed=0).train_examples(-1)
