"""The TPU kernels compile for TPU topologies without a TPU (JAX >= 0.11, libtpu).

`jax.experimental.topologies` gives compile-only devices of a v5e and a v4
slice; libtpu compiles each kernel (forward, dQ, dK/dV) for them as it would
on the machine (`kernels.bench.tpu_compile`). A kernel Mosaic rejects (a
block shape off the (8, 128) tiling, an op with no TPU lowering, VMEM over
the limit) fails here, though the interpreter tests would pass. Each test
records what the compiler reported (VMEM, HBM, warnings) in its output
(`pytest -s`); BENCHMARKS.md's TPU section holds the figures. CI's second
pass (Python 3.12, JAX 0.11.2, libtpu 0.0.52) runs these; elsewhere they
skip with the reason.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from fusedlm.kernels.bench import tpu_compile
from fusedlm.kernels.tpu.attention import tpu_attention_any_device
from fusedlm.kernels.tpu.block_sizes import DEFAULT_SCOPED_VMEM, TpuBlockSizes

if jax.__version_info__ < tpu_compile.MIN_JAX:
  pytest.skip(f"compiling for a TPU topology needs JAX >= 0.11 (this is"
              f" {jax.__version__}); CI's second pass runs it",
              allow_module_level=True)
if importlib.util.find_spec("libtpu") is None:
  pytest.skip(f"libtpu is not installed (pip install {tpu_compile.LIBTPU});"
              " CI's second pass installs it", allow_module_level=True)

TOPOLOGIES = ["v5e:2x2", "v4:2x2x1"]
KIND = {"v5e:2x2": "TPU v5 lite", "v4:2x2x1": "TPU v4"}


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_kernel_compiles(topology, head_dim):
  # GQA 2:1, causal, packed sequences, an odd length: every optional input
  # of the plain kernels, every block-range path.
  problem = tpu_compile.Problem(head_dim=head_dim, seq_len=1000, heads=4,
                                kv_heads=2, batch=2, causal=True, segments=True)
  reports = tpu_compile.inspect_kernels(topology, problem, vmem=False)
  assert [r.kernel for r in reports] == ["forward", "dq", "dkv"]
  for r in reports:
    print(tpu_compile.format_row(head_dim, r))
    assert r.device_kind == KIND[topology]
    assert r.hbm["output"] > 0, r
    assert r.warnings == (), r.warnings


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_vmem_need_is_measured_and_within_the_default_limit(topology):
  # Bisection at 256 KiB (the tool uses 64 KiB): enough to show where the
  # compiler's limit lies, in a third of the compiles.
  problem = tpu_compile.Problem(head_dim=128)
  blocks = TpuBlockSizes.get_default(128)
  device = tpu_compile.topology_devices(topology)[0]
  for kernel in tpu_compile.KERNELS:
    need = tpu_compile.min_vmem_bytes(kernel, problem, blocks, device,
                                      resolution=256 * 1024)
    print(f"{topology} {kernel}: compiles with {need // 1024} KiB of scoped VMEM")
    # At least the float32 accumulators of the kernel's own scratch.
    scratch = {"forward": 3 * 512 * 128 * 4, "dq": 256 * 128 * 4,
               "dkv": 2 * 256 * 128 * 4}[kernel]
    assert scratch < need <= DEFAULT_SCOPED_VMEM // 2, (kernel, need)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_variant_compiles_forward_and_backward(topology):
  # Bias (with d bias), per-head mask, window, soft-cap, lse with its
  # cotangent, top-left causal, cross lengths; then dropout with padding and
  # segments: the Philox bits in uint32 on the vector unit.
  device = tpu_compile.topology_devices(topology)[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  b, nq, nk, h, hkv, d = 2, 300, 700, 4, 2, 128
  q, kv = arg((b, nq, h, d), jnp.bfloat16), arg((b, nk, hkv, d), jnp.bfloat16)

  def variants(q, k, v, bias, mask):
    def loss(q, k, v, bias):
      out, lse = tpu_attention_any_device(
          q, k, v, bias=bias, mask=mask, causal=True,
          causal_alignment="top_left", local_window_size=(256, 0),
          logits_soft_cap=30.0, return_lse=True)
      return out.astype(jnp.float32).sum() + lse.sum()
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

  def dropout(q, k, v, padding, q_ids, kv_ids):
    loss = lambda q, k, v: tpu_attention_any_device(
        q, k, v, key_padding_mask=padding, segment_ids=q_ids,
        kv_segment_ids=kv_ids, dropout_rate=0.1,
        dropout_rng=jax.random.PRNGKey(0)).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  for fn, args in (
      (variants, (q, kv, kv, arg((1, h, nq, nk), jnp.float32),
                  arg((b, 1, nq, nk), jnp.bool_))),
      (dropout, (q, kv, kv, arg((b, nk), jnp.bool_), arg((b, nq), jnp.int32),
                 arg((b, nk), jnp.int32)))):
    compiled, found = tpu_compile.compile_with_warnings(fn, *args)
    hlo = compiled.as_text()
    for kernel in ("fusedlm_tpu_fwd", "fusedlm_tpu_bwd_dq", "fusedlm_tpu_bwd_dkv"):
      assert kernel in hlo, f"{fn.__name__}: {kernel} not in the program"
    assert found == (), found


@pytest.mark.parametrize("dtype, head_dim, v_head_dim", [
    (jnp.float32, 64, 64),  # float32 at full precision on the MXU
    (jnp.bfloat16, 80, 48),  # head dims off the 128 lanes, unpadded
])
def test_other_dtypes_and_head_dims_compile(dtype, head_dim, v_head_dim):
  device = tpu_compile.topology_devices("v5e:2x2")[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  q = jax.ShapeDtypeStruct((2, 513, 8, head_dim), dtype, sharding=sharding)
  k = jax.ShapeDtypeStruct((2, 513, 2, head_dim), dtype, sharding=sharding)
  v = jax.ShapeDtypeStruct((2, 513, 2, v_head_dim), dtype, sharding=sharding)
  grad = jax.grad(lambda q, k, v: tpu_attention_any_device(
      q, k, v, causal=True).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  _, found = tpu_compile.compile_with_warnings(grad, q, k, v)
  assert found == (), found


def test_compiler_warnings_are_collected():
  # What the report's warnings column rests on: a Python warning and a
  # libtpu-style log line written to stderr while compiling are both caught.
  import os
  import warnings

  def noisy(x):
    warnings.warn("planted warning")
    os.write(2, b"W1204 00:00:00.000000 1 planted.cc:1] planted log line\n")
    return x + 1

  device = tpu_compile.topology_devices("v5e:2x2")[0]
  x = jax.ShapeDtypeStruct((8, 128), jnp.float32,
                           sharding=jax.sharding.SingleDeviceSharding(device))
  _, found = tpu_compile.compile_with_warnings(noisy, x)
  assert "UserWarning: planted warning" in found
  assert any("planted log line" in line for line in found), found
