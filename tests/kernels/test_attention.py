"""The entry point: dispatch, and a clear ValueError for every bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm import kernels
from fusedlm.kernels import (
  BlockSizes,
  dot_product_attention,
  flash_attention,
  reference_attention,
  resolve_implementation,
)
from fusedlm.kernels import cudnn
from tests.kernels.attention_cases import Case, make_inputs
from tests.kernels.stand_ins import H100

Q = jnp.ones((2, 8, 4, 32))
K = jnp.ones((2, 8, 2, 32))


def test_auto_on_this_machine():
  """mosaic on a Hopper GPU, pallas on another GPU, tpu on a TPU, xla elsewhere (the whole
  rule, with stand-in devices: test_resolve_implementation.py)."""
  device = jax.devices()[0]
  q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
  hopper = (str(getattr(device, "compute_capability", "")).startswith("9.")
            and jax.__version_info__ >= (0, 11))
  expected = ("mosaic" if hopper else "pallas") if device.platform == "gpu" else (
      "tpu" if device.platform == "tpu" else "xla")
  assert resolve_implementation("auto", q, q, q) == expected


@pytest.mark.parametrize("implementation", ["auto", "pallas", "xla"])
def test_every_implementation_matches_the_reference(implementation):
  q, k, v, _, masks = make_inputs(
      Case(q_len=20, kv_len=20, heads=4, kv_heads=2, causal=True, masks="both"), 7)
  out = dot_product_attention(q, k, v, causal=True, implementation=implementation,
                              **masks)
  ref = reference_attention(q, k, v, causal=True, **masks)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


@pytest.mark.gpu
def test_cudnn_matches_the_reference_in_bf16():
  q, k, v, _, masks = make_inputs(
      Case(q_len=128, kv_len=128, heads=4, kv_heads=2, head_dim=64,
           causal=True, masks="padding", dtype=jnp.bfloat16), 8)
  out = dot_product_attention(q, k, v, causal=True, implementation="cudnn", **masks)
  up = lambda x: x.astype(jnp.float32)
  ref = reference_attention(up(q), up(k), up(v), causal=True, **masks)
  np.testing.assert_allclose(np.asarray(up(out)), np.asarray(ref), atol=2e-2)


def test_cudnn_gets_key_padding_as_a_full_mask(monkeypatch):
  """JAX 0.11's cuDNN path takes a mask only at full [B, 1, T, S] length."""
  seen = {}

  def cudnn_stand_in(q, k, v, *, bias, mask, scale, is_causal, local_window_size,
                     implementation):
    seen.update(mask=mask, implementation=implementation, is_causal=is_causal,
                bias=bias, local_window_size=local_window_size)
    return jnp.zeros_like(q)
  monkeypatch.setattr(cudnn.jax.nn, "dot_product_attention", cudnn_stand_in)
  q, k, v, _, masks = make_inputs(
      Case(q_len=24, kv_len=40, heads=4, kv_heads=2, head_dim=64, masks="padding",
           dtype=jnp.bfloat16), 9)
  with kernels.target_device(H100):
    dot_product_attention(q, k, v, implementation="cudnn", **masks)
  assert seen["implementation"] == "cudnn" and not seen["is_causal"]
  assert seen["bias"] is None and seen["local_window_size"] is None
  padding = np.asarray(masks["key_padding_mask"])
  np.testing.assert_array_equal(
      np.asarray(seen["mask"]), np.broadcast_to(padding[:, None, None, :], (2, 1, 24, 40)))


def test_cudnn_refuses_packed_sequences_naming_the_way_out():
  q, k, v, _, masks = make_inputs(Case(masks="segments", dtype=jnp.bfloat16), 2)
  with kernels.target_device(H100), pytest.raises(
      ValueError, match=r"does not take segment_ids .*use 'auto' or 'mosaic'"):
    dot_product_attention(q, k, v, implementation="cudnn", **masks)


BAD_INPUTS = [
    (dict(q=jnp.ones((2, 8, 4, 32, 1))), "q must have rank 4"),
    (dict(q=jnp.ones((8, 4, 32))), r"q has rank 3 \(unbatched\), so k and v must too"),
    (dict(k=jnp.ones((3, 8, 2, 32)), v=jnp.ones((3, 8, 2, 32))), "batch size mismatch"),
    (dict(k=jnp.ones((2, 8, 2, 16)), v=jnp.ones((2, 8, 2, 16))), "head_dim mismatch"),
    (dict(k=jnp.ones((2, 8, 3, 32)), v=jnp.ones((2, 8, 3, 32))),
     r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    (dict(v=jnp.ones((2, 9, 2, 32))), "k and v must share"),
    (dict(q=jnp.ones((2, 8, 4, 32), jnp.int32), k=jnp.ones((2, 8, 2, 32), jnp.int32),
          v=jnp.ones((2, 8, 2, 32), jnp.int32)), "unsupported dtype int32"),
    (dict(q=jnp.ones((2, 8, 4, 32), jnp.bfloat16)), "must share one dtype"),
    (dict(key_padding_mask=jnp.ones((2, 7), bool)), r"key_padding_mask must have shape"),
    (dict(key_padding_mask=jnp.ones((2, 8), jnp.int32)), "must be bool"),
    (dict(segment_ids=jnp.ones((2, 9), jnp.int32)), r"segment_ids must have shape"),
    (dict(segment_ids=jnp.ones((2, 8), jnp.float32)), "segment_ids must be integers"),
    (dict(kv_segment_ids=jnp.ones((2, 8), jnp.int32)), "without segment_ids"),
    (dict(k=jnp.ones((2, 5, 2, 32)), v=jnp.ones((2, 5, 2, 32)),
          segment_ids=jnp.ones((2, 8), jnp.int32)), "pass kv_segment_ids"),
]


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("bad,message", BAD_INPUTS, ids=lambda x: str(x)[:40])
def test_bad_input_raises_a_named_value_error(bad, message, implementation):
  args = dict(q=Q, k=K, v=K)
  args.update(bad)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  with pytest.raises(ValueError, match=message):
    dot_product_attention(q, k, v, implementation=implementation, **args)


@pytest.mark.parametrize("fields,message", [
    (dict(block_q=48), "block_q must be a power of two"),
    (dict(block_k_dq=8), "block_k_dq must be at least 16"),
    (dict(num_warps_fwd=3), "num_warps_fwd must be"),
])
def test_bad_block_sizes_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    BlockSizes(**fields)


def test_blocks_that_overflow_shared_memory_are_refused():
  huge = BlockSizes(block_q=256, block_k=256, num_stages_fwd=4)
  q = jnp.ones((1, 512, 1, 256), jnp.float32)
  with pytest.raises(ValueError, match="block sizes do not fit"):
    flash_attention(q, q, q, block_sizes=huge, interpret=True)


def test_block_sizes_must_be_a_block_sizes():
  with pytest.raises(ValueError, match="must be a BlockSizes"):
    flash_attention(Q, K, K, block_sizes=(64, 64), interpret=True)


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    dot_product_attention(Q, K, K, implementation="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_compiled_kernel_without_a_gpu_says_so():
  with pytest.raises(ValueError, match="compiles only for NVIDIA GPUs"):
    dot_product_attention(Q, K, K, implementation="pallas", interpret=False)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_cudnn_without_a_gpu_says_so():
  q = Q.astype(jnp.bfloat16)
  k = K.astype(jnp.bfloat16)
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    dot_product_attention(q, k, k, implementation="cudnn")


@pytest.mark.parametrize("kwargs,message", [
    (dict(segment_ids=jnp.ones((2, 8), jnp.int32)), "does not take segment_ids"),
    (dict(causal=True, k=jnp.ones((2, 6, 2, 32), jnp.bfloat16)), "aligns the causal mask"),
    (dict(q=Q), "takes bfloat16 or float16"),
])
def test_cudnn_refuses_what_it_cannot_take(kwargs, message):
  # Checked before any cuDNN call, so the test runs on every backend.
  args = dict(q=Q.astype(jnp.bfloat16), k=K.astype(jnp.bfloat16))
  args.update(kwargs)
  q, k = args.pop("q"), args.pop("k")
  if q.dtype != k.dtype:
    k = k.astype(q.dtype)
  with kernels.target_device(H100), pytest.raises(ValueError, match=message):
    dot_product_attention(q, k, k, implementation="cudnn", **args)


def test_array_likes_are_converted_and_other_values_named():
  q = np.random.RandomState(0).randn(1, 8, 2, 16).astype(np.float32)
  from_lists = dot_product_attention(q.tolist(), q.tolist(), q.tolist(), causal=True,
                                     implementation="xla")
  np.testing.assert_array_equal(
      from_lists, dot_product_attention(q, q, q, causal=True, implementation="xla"))
  with pytest.raises(TypeError, match=r"^k must be an array or an array-like .* got str"):
    dot_product_attention(q, "keys", q)
  with pytest.raises(TypeError, match=r"^key_padding_mask must be an array .* got dict"):
    dot_product_attention(q, q, q, key_padding_mask={"a": 1})
