"""Proves the Mosaic GPU interpreter shim (tests/kernels/mosaic/interpreter_shim.py).

JAX's own FA3 kernel (`jax.experimental.pallas.ops.gpu.attention_mgpu`) runs
on CPU under the shim and matches a float32 XLA reference; a tiny
`emit_pipeline` kernel covers the predicated SMEM -> GMEM copy. Shapes are the
smallest the kernel accepts (blocks of 64, head_dim 64), in float16; seq 256
makes the two-slot TMA rings wrap, so the barrier-teardown patch is exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.mosaic import interpreter_shim as mosaic_interpret

pytestmark = pytest.mark.skipif(
    not mosaic_interpret.SUPPORTED, reason=mosaic_interpret.REASON)


def _attention_mgpu():
  from jax.experimental.pallas.ops.gpu import attention_mgpu
  return attention_mgpu


def _config(causal):
  return _attention_mgpu().TuningConfig(
      block_q=64, block_kv=64, max_concurrent_steps=2, causal=causal,
      block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)


def _inputs(seq, heads, seed):
  """q, k, v, d_out: float16 [batch=1, seq, heads, head_dim=64]."""
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(key, (1, seq, heads, 64), jnp.float16)
          for key in keys]


def _reference(q, k, v, causal):
  """float32 XLA attention; attention_mgpu applies no 1/sqrt(d) scale."""
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  return jax.nn.dot_product_attention(*f32, scale=1.0, is_causal=causal,
                                      implementation="xla")


@pytest.mark.parametrize("causal, seq, heads", [(False, 128, 1),
                                                (True, 256, 2)])
def test_attention_mgpu_forward(causal, seq, heads):
  q, k, v, _ = _inputs(seq, heads, seed=seq + causal)
  with mosaic_interpret.mosaic_interpreter():
    out = _attention_mgpu().attention(q, k, v, _config(causal))
    out = np.asarray(out, np.float32)
  ref = np.asarray(_reference(q, k, v, causal))
  np.testing.assert_allclose(out, ref, atol=5e-3, rtol=0)


def test_attention_mgpu_backward():
  # Upstream has no causal backward. Gradients reach ~30 in magnitude here and
  # the kernel rounds P and dS to float16, hence the looser tolerance.
  q, k, v, d_out = _inputs(256, 1, seed=7)
  with mosaic_interpret.mosaic_interpreter():
    _, vjp = jax.vjp(
        lambda *qkv: _attention_mgpu().attention(*qkv, _config(False)),
        q, k, v)
    grads = [np.asarray(g, np.float32) for g in vjp(d_out)]
  _, vjp_ref = jax.vjp(lambda *qkv: _reference(*qkv, causal=False),
                       *[x.astype(jnp.float32) for x in (q, k, v)])
  for name, got, want in zip("qkv", grads, vjp_ref(d_out.astype(jnp.float32))):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, atol=4e-2 + 1e-3 * np.abs(want).max(),
                               rtol=0, err_msg=f"d{name}")


def test_predicated_copy_out_and_patches_restored():
  # plgpu.emit_pipeline stores each output block with a predicated
  # copy_smem_to_gmem; stock 0.11.2 raises "predicate not supported".
  import jax.experimental.pallas.mosaic_gpu as plgpu

  def kernel(x_gmem, o_gmem):
    def body(_, x_smem, o_smem):
      o_smem[...] = x_smem[...] * 2 + 1
    spec = plgpu.BlockSpec((64, 64), lambda i: (i, 0))
    plgpu.emit_pipeline(body, grid=(4,), in_specs=[spec], out_specs=[spec],
                        max_concurrent_steps=2)(x_gmem, o_gmem)

  x = jax.random.normal(jax.random.key(3), (256, 64), jnp.float32)
  interp = mosaic_interpret.jaxpr_interpret.JaxprInterpreter
  stock = interp.__dict__["interpret"]
  with mosaic_interpret.mosaic_interpreter() as params:
    out = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       interpret=params)(x)
    out = np.asarray(out)
    assert interp.__dict__["interpret"] is not stock
  assert interp.__dict__["interpret"] is stock
  np.testing.assert_allclose(out, np.asarray(x) * 2 + 1, rtol=1e-6)
