"""The kernels lower to Triton IR, checked on any machine.

Lowering for the "cuda" platform needs no GPU; it runs the Pallas-to-Triton
lowering rules, which reject what Triton cannot take (tiles that are not
powers of two, unsupported primitives). Compiling that IR to PTX, and the
numbers, are left to the `gpu`-marked tests.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from fusedlm.kernels import BlockSizes, flash_attention, target_device
from fusedlm.kernels.bench.mosaic_compile import PLUGINS
from tests.kernels.stand_ins import H100

# JAX >= 0.11 with its CUDA plugin installed compiles Triton kernels while
# lowering, which needs a GPU; CI's second pass installs the plugin (for the
# Mosaic compile test), its first pass (JAX 0.10.2) runs this.
_COMPILES_AT_LOWERING = (
    jax.__version_info__ >= (0, 11)
    and any(importlib.util.find_spec(p) for p in PLUGINS)
    and jax.default_backend() != "gpu")


def lower_forward_and_backward_for_cuda(q, k, causal, masks, block_sizes):
  def f(q, k, v, masks):
    loss = lambda q, k, v: jnp.sum(flash_attention(
        q, k, v, causal=causal, block_sizes=block_sizes, **masks
    ).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return jax.jit(f).trace(q, k, k, masks).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("causal,masks,q_len,kv_len,kv_heads", [
    (True, (), 1000, 1000, 1),
    (False, ("segment_ids",), 256, 256, 2),
    (True, ("key_padding_mask", "segment_ids", "kv_segment_ids"), 100, 300, 4),
])
@pytest.mark.skipif(
    _COMPILES_AT_LOWERING,
    reason="JAX >= 0.11 with a CUDA plugin compiles Triton kernels at lowering"
    " (needs a GPU); the JAX 0.10.2 pass lowers them")
def test_kernels_lower_to_triton(head_dim, dtype, causal, masks, q_len, kv_len,
                                 kv_heads, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  batch, heads = 2, 4
  q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype)
  k = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)
  shapes = {
      "key_padding_mask": jax.ShapeDtypeStruct((batch, kv_len), jnp.bool_),
      "segment_ids": jax.ShapeDtypeStruct((batch, q_len), jnp.int32),
      "kv_segment_ids": jax.ShapeDtypeStruct((batch, kv_len), jnp.int32),
  }
  blocks = BlockSizes.get_default(head_dim, dtype)
  with target_device(H100):  # the kernel checks the device it is traced for
    lowered = lower_forward_and_backward_for_cuda(
        q, k, causal, {m: shapes[m] for m in masks}, blocks)
  text = lowered.as_text()
  for kernel in ("fusedlm_flash_fwd", "fusedlm_flash_bwd_dkv",
                 "fusedlm_flash_bwd_dq"):
    assert f'name = "{kernel}"' in text, f"{kernel} was not lowered to Triton"
