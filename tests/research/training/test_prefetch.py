"""The prefetcher hands over exactly batch(step), in order, on the devices; a
failure in its thread is raised in the loop; closing it early stops the thread."""

import jax
import numpy as np
import pytest

from fusedlm.research.runs import parallel
from fusedlm.research.training.prefetch import Prefetcher


def _batch(step):
  return {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3) + 100 * step}


def test_batches_arrive_in_order_on_the_devices():
  devices = jax.local_devices()[:4]
  batches = Prefetcher(_batch, range(5, 9), devices)
  try:
    for step in range(5, 9):
      got = batches.get(step)["inputs"]
      assert got.shape == (4, 2, 3)
      assert {shard.device for shard in got.addressable_shards} == set(devices)
      np.testing.assert_array_equal(got, parallel.shard(_batch(step), 4)["inputs"])
  finally:
    batches.close()


def test_a_failure_in_the_thread_is_raised_in_the_loop():
  def broken(step):
    if step == 2:
      raise ValueError("corpus file vanished")
    return _batch(step)

  batches = Prefetcher(broken, range(4), jax.local_devices()[:2])
  try:
    batches.get(0), batches.get(1)
    with pytest.raises(ValueError, match="corpus file vanished"):
      batches.get(2)
  finally:
    batches.close()


def test_closing_early_stops_the_thread():
  batches = Prefetcher(_batch, range(10_000), jax.local_devices()[:2], depth=2)
  batches.get(0)
  batches.close()
  assert not batches._thread.is_alive()  # pylint: disable=protected-access
