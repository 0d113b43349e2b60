"""pmap plumbing on fake CPU devices (tests/conftest.py asks for 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.research.runs import parallel


def test_shard_splits_the_leading_axis_over_devices():
  batch = {"inputs": np.arange(32).reshape(16, 2), "labels": np.arange(16)}
  sharded = parallel.shard(batch, num_devices=8)
  assert sharded["inputs"].shape == (8, 2, 2)
  np.testing.assert_array_equal(sharded["labels"][3], [6, 7])


def test_a_batch_the_devices_cannot_split_is_refused():
  with pytest.raises(ValueError, match="batch size 10 is not divisible by the 8"):
    parallel.shard({"x": np.zeros((10, 3))}, num_devices=8)


def test_replicate_then_unreplicate_round_trips_and_feeds_pmap():
  n = jax.local_device_count()
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(4)}
  replicated = parallel.replicate(tree)
  assert replicated["w"].shape == (n, 2, 3)
  back = parallel.unreplicate(replicated)
  np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(tree["w"]))
  assert int(back["step"]) == 4
  # Each device adds its own shard of the batch; pmean gives the global mean.
  batch = parallel.shard({"x": np.arange(2 * n, dtype=np.float32)}, n)
  step = jax.pmap(lambda t, b: jax.lax.pmean(t["w"] + jnp.mean(b["x"]),
                                             parallel.AXIS),
                  axis_name=parallel.AXIS)
  out = step(replicated, batch)
  np.testing.assert_allclose(np.asarray(out[0]),
                             np.asarray(tree["w"]) + (2 * n - 1) / 2)
