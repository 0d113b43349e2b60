"""The kernel composes with jit, vmap, grad, remat and pmap (interpreter on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.kernels import BlockSizes, flash_attention, reference_attention
from tests.kernels.attention_cases import Case, assert_close, make_inputs

BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16,
                    block_q_dq=16, block_k_dq=16)
CASE = Case(batch=2, q_len=24, kv_len=24, heads=2, kv_heads=1, causal=True)


def flash(q, k, v, **kw):
  return flash_attention(q, k, v, causal=True, block_sizes=BLOCKS,
                         interpret=jax.default_backend() != "gpu", **kw)


def reference(q, k, v, **kw):
  return reference_attention(q, k, v, causal=True, **kw)


def loss(attention):
  return lambda q, k, v: jnp.sum(jnp.tanh(attention(q, k, v)))


def test_jit_of_a_closure_with_static_options():
  q, k, v, _, _ = make_inputs(CASE, seed=0)
  out = jax.jit(lambda q, k, v: flash(q, k, v) * 2.0)(q, k, v)
  assert_close(np.asarray(out), np.asarray(reference(q, k, v) * 2.0), 2e-5, "jit")


def test_vmap_over_a_leading_axis_forward_and_grad():
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(keys[0], (3, 2, 24, 2, 32))
  k = jax.random.normal(keys[1], (3, 2, 24, 1, 32))
  v = jax.random.normal(keys[2], (3, 2, 24, 1, 32))
  out = jax.vmap(flash)(q, k, v)
  ref = jax.vmap(reference)(q, k, v)
  assert_close(np.asarray(out), np.asarray(ref), 2e-5, "vmap output")
  grads = jax.vmap(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.vmap(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
  for name, g, r in zip("qkv", grads, ref_grads):
    assert_close(np.asarray(g), np.asarray(r), 1e-4, f"vmap d{name}")


def test_remat_gives_the_same_gradients():
  q, k, v, _, _ = make_inputs(CASE, seed=2)
  plain = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
  remat = jax.grad(jax.checkpoint(loss(flash)), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", plain, remat):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6,
                               err_msg=f"remat d{name}")


def test_segment_ids_under_vmap_and_grad():
  q, k, v, _, masks = make_inputs(
      Case(batch=2, q_len=40, kv_len=40, masks="both"), seed=4)
  f = lambda q, k, v: flash_attention(q, k, v, block_sizes=BLOCKS,
                                      interpret=True, **masks)
  r = lambda q, k, v: reference_attention(q, k, v, **masks)
  grads = jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(loss(r), argnums=(0, 1, 2))(q, k, v)
  for name, g, rg in zip("qkv", grads, ref_grads):
    assert_close(np.asarray(g), np.asarray(rg), 1e-4, f"d{name}")


@pytest.mark.skipif(jax.local_device_count() < 2,
                    reason="needs several devices (tests/conftest.py fakes 8 CPUs)")
def test_pmap_with_gradient_mean_across_devices():
  n = jax.local_device_count()
  keys = jax.random.split(jax.random.PRNGKey(6), 3)
  q = jax.random.normal(keys[0], (n, 1, 20, 2, 32))
  k = jax.random.normal(keys[1], (n, 1, 20, 2, 32))
  v = jax.random.normal(keys[2], (n, 1, 20, 2, 32))

  def step(attention):
    def per_device(q, k, v):
      grads = jax.grad(loss(attention), argnums=(0, 1, 2))(q, k, v)
      return attention(q, k, v), jax.lax.pmean(grads, "batch")
    return jax.pmap(per_device, axis_name="batch")

  out, grads = step(flash)(q, k, v)
  ref_out, ref_grads = step(reference)(q, k, v)
  assert_close(np.asarray(out), np.asarray(ref_out), 2e-5, "pmap output")
  for name, g, r in zip("qkv", grads, ref_grads):
    assert_close(np.asarray(g), np.asarray(r), 1e-4, f"pmap d{name}")
