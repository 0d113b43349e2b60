"""The trainer's host-side work per step: every part timed, on the real pipeline's batches."""

import jax
import numpy as np
import pytest

from fusedlm.research.training import host_costs


def test_every_part_is_timed_per_step_and_the_total_adds_up():
  seen = []

  def make_batch(step):
    seen.append(step)
    tokens = np.full((4, 16), step, np.int32)
    return {"inputs": tokens, "targets": tokens, "loss_mask": np.ones((4, 16), np.float32)}

  costs = host_costs.host_costs(make_batch, jax.local_devices()[:1], range(3, 8))
  assert seen == [3, 4, 5, 6, 7] and costs["steps"] == 5
  for part in host_costs.PARTS:
    assert 0 < costs[part]["median_ms"] <= costs[part]["max_ms"]
  assert costs["total_median_ms"] == pytest.approx(
      sum(costs[part]["median_ms"] for part in host_costs.PARTS))


def test_no_steps_is_an_error():
  with pytest.raises(ValueError, match="at least one step"):
    host_costs.host_costs(lambda step: {}, jax.local_devices()[:1], [])
