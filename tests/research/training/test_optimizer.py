"""Schedules, the weight-decay mask, clipping and accumulation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fusedlm.research.training.optimizer import build_optimizer, decay_mask, learning_rate_schedule


def config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0,
      accumulation_steps=1,
  ))
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_then_decay_to_the_floor(schedule):
  lr = learning_rate_schedule(config(schedule=schedule), total_steps=110)
  np.testing.assert_allclose(float(lr(0)), 0.0)
  np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(110)), 1e-4, rtol=1e-5)
  middle = float(lr(60))  # half-way through the decay
  expected = 5.5e-4  # both shapes pass the mid-point of peak and floor
  np.testing.assert_allclose(middle, expected, rtol=1e-5)


def test_unknown_schedule_and_bad_warmup_are_named():
  with pytest.raises(ValueError, match="unknown optimizer.schedule 'step'"):
    learning_rate_schedule(config(schedule="step"), 100)
  with pytest.raises(ValueError, match="warmup_steps"):
    learning_rate_schedule(config(warmup_steps=200), 100)


def test_decay_applies_to_weight_matrices_only():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
            "Embed_0": {"embedding": jnp.ones((5, 2))}}
  mask = decay_mask(params)
  assert mask == {"Dense_0": {"kernel": True, "bias": False},
                  "LayerNorm_0": {"scale": False, "bias": False},
                  "Embed_0": {"embedding": False}}
  # With zero gradients only weight decay moves a parameter.
  tx = build_optimizer(config(warmup_steps=0, grad_clip_norm=0.0), 10)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  moved = jax.tree_util.tree_map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved == mask


def test_clipping_bounds_the_global_norm():
  tx = optax.clip_by_global_norm(1.0)
  grads = {"a": jnp.full((3,), 10.0)}
  clipped, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-6)
  # The optimizer clips before Adam: a huge gradient gives a bounded first step.
  params = {"w": {"kernel": jnp.zeros((3,))}}
  opt = build_optimizer(config(warmup_steps=0, weight_decay=0.0), 10)
  huge = {"w": {"kernel": jnp.array([1e6, 0.0, 0.0])}}
  updates, _ = opt.update(huge, opt.init(params), params)
  assert float(jnp.max(jnp.abs(updates["w"]["kernel"]))) <= 1e-3 * 1.01


def test_accumulation_averages_micro_batches_into_one_update():
  params = {"w": {"kernel": jnp.array([1.0, -2.0])}}
  g1 = {"w": {"kernel": jnp.array([0.5, 1.0])}}
  g2 = {"w": {"kernel": jnp.array([1.5, -3.0])}}
  base = dict(warmup_steps=0, schedule="constant", grad_clip_norm=0.0)
  accumulated = build_optimizer(config(accumulation_steps=2, **base), 10)
  state = accumulated.init(params)
  first, state = accumulated.update(g1, state, params)
  np.testing.assert_array_equal(np.asarray(first["w"]["kernel"]), 0.0)
  second, _ = accumulated.update(g2, state, params)
  single = build_optimizer(config(**base), 10)
  mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = single.update(mean, single.init(params), params)
  np.testing.assert_allclose(np.asarray(second["w"]["kernel"]),
                             np.asarray(expected["w"]["kernel"]), rtol=1e-6)
