"""Our Mosaic GPU kernel compiles for the H100 (sm_90a) on a CPU machine, and the report reads it.

`kernels.bench.mosaic_compile` compiles for a compile-only H100 (JAX >= 0.11, its
CUDA plugin and ptxas; see the module's docstring) and parses Mosaic's dumps.
For `kernels.mosaic.attention`'s forward and backward at head dims 64 and
128, causal or not, with segment ids or not, and grouped-query heads (4:1),
then with its variants (bias, window, soft-cap, dropout, lse output, a value
head dim of its own) and at head dim 256, each of its three kernels
(forward, dQ, dK/dV) must:

  * compile for sm_90a, with the three warpgroups (384 threads) it is written for;
  * not spill (a consumer holding dK and dV at 240 registers is the tight one);
  * fit the H100's 227 KiB of shared memory;
  * do its products with wgmma, of the head dim's N where that is the N, and
    load through TMA.

The parser is also checked on a canned ptxas log / PTX / launch (every JAX);
the compiling tests skip, with the reason, where JAX < 0.11 or the plugin or
ptxas is missing (CI's second pass, Python 3.12 / JAX 0.11.2, installs them).
"""

import dataclasses

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedlm.kernels.bench import mosaic_cases
from fusedlm.kernels.bench import mosaic_compile as mi
from fusedlm.kernels.mosaic.attention import mosaic_attention_any_device
from fusedlm.kernels.mosaic.tiles import Dims, MosaicBlockSizes

SEQ_LEN = 2048
HEADS = 8
KERNELS = ("fusedlm_mosaic_fwd", "fusedlm_mosaic_bwd_dq", "fusedlm_mosaic_bwd_dkv")
PLAIN = dict(causal=False, segments=False, group=1, variants=(), v_head_dim=None,
             bias_dtype=None)
SETTINGS = [
    dict(PLAIN, head_dim=d, causal=c, segments=s)
    for d in (64, 128) for c in (False, True) for s in (False, True)
] + [dict(PLAIN, head_dim=d, causal=True, group=4) for d in (64, 128)] + [
    # The variants (kernels.variants), each where its tiles are tightest: a
    # float32 bias at 128 (the dQ kernel stages d bias in the bias ring), the
    # soft-cap and dropout at 128 (the dK/dV consumers split dK and dV).
    dict(PLAIN, head_dim=64, causal=True, variants=("bias",), bias_dtype="float32"),
    dict(PLAIN, head_dim=128, causal=True, variants=("bias",), bias_dtype="float32"),
    dict(PLAIN, head_dim=64, variants=("window", "lse")),
    dict(PLAIN, head_dim=128, causal=True, segments=True, variants=("window",)),
    dict(PLAIN, head_dim=64, causal=True, group=2, variants=("softcap", "dropout")),
    dict(PLAIN, head_dim=128, causal=True, variants=("softcap", "dropout")),
    dict(PLAIN, head_dim=64, v_head_dim=128, causal=True),
    # Head dim 256: the dQ consumers split the head dim, dK/dV's take roles.
    dict(PLAIN, head_dim=256, causal=True, segments=True, group=2),
    dict(PLAIN, head_dim=256, causal=True, variants=("dropout", "softcap")),
]


def _id(setting):
  s = setting
  dv = f"_dv{s['v_head_dim']}" if s["v_head_dim"] else ""
  return (f"d{s['head_dim']}{dv}"
          f"_{'causal' if s['causal'] else 'full'}{'_segments' if s['segments'] else ''}"
          f"_g{s['group']}" + "".join(f"_{v}" for v in s["variants"])
          + (f"_{s['bias_dtype']}" if s["bias_dtype"] else ""))


@pytest.fixture(scope="module")
def compiler():
  try:
    return mi.check_environment()
  except mi.InspectError as e:
    pytest.skip(f"cannot compile Mosaic GPU kernels here: {e}")


@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_forward_and_backward_compile_for_sm90_without_spills(compiler, setting):
  del compiler
  head_dim = setting["head_dim"]
  v_head_dim = setting["v_head_dim"] or head_dim
  fn, args = mosaic_cases.fusedlm_case(
      head_dim, SEQ_LEN, HEADS, "bwd", causal=setting["causal"],
      segments=setting["segments"], group=setting["group"],
      variants=setting["variants"], v_head_dim=setting["v_head_dim"],
      bias_dtype=setting["bias_dtype"])
  reports = mi.inspect(fn, *args)
  table = "\n".join([mi.HEADER] + [mi.format_row(_id(setting), r) for r in reports])
  assert tuple(r.name for r in reports) == KERNELS, table
  for r in reports:
    assert r.threads == 384, table  # two consumer warpgroups and a producer
    assert 0 < r.registers <= 255, table
    assert r.spill_store_bytes == r.spill_load_bytes == 0, table
    assert r.smem_bytes <= mi.SMEM_LIMIT, table
    assert r.wgmma_count > 0 and r.tma_loads > 0, table
  forward, dq, dkv = reports
  # P @ V (forward) has V's head dim as N, dS @ K (dQ) K's (a half past 128,
  # where the dQ consumers split it); dK/dV's S^T and dP^T have the query
  # tile (64).
  dq_n = head_dim if head_dim <= 128 else head_dim // 2
  assert f"m64n{v_head_dim}k16" in forward.wgmma, table
  assert f"m64n{dq_n}k16" in dq.wgmma and "m64n64k16" in dkv.wgmma, table


DQ_ATOMIC = [  # tuning step M5 where it applies
    dict(PLAIN, head_dim=64, causal=True, segments=True, group=4),
    dict(PLAIN, head_dim=64, causal=True, variants=("dropout",)),
    dict(PLAIN, head_dim=64, variants=("window", "lse")),
    # Past 64 the consumers split dQ's columns (no diagonal mask there).
    dict(PLAIN, head_dim=128),
    dict(PLAIN, head_dim=128, segments=True, group=4, variants=("lse",)),
    dict(PLAIN, head_dim=64, v_head_dim=128),
]


@pytest.mark.parametrize("setting", DQ_ATOMIC, ids=_id)
def test_dq_atomic_adds_dq_in_the_dkv_kernel_without_spills(compiler, setting):
  # No dQ kernel; the dK/dV kernel gains dQ's products (dS K: more wgmma
  # than the plain dK/dV kernel), without spills, within shared memory.
  del compiler
  case = dict(causal=setting["causal"], segments=setting["segments"],
              group=setting["group"], variants=setting["variants"],
              v_head_dim=setting["v_head_dim"])
  fn, args = mosaic_cases.fusedlm_case(
      setting["head_dim"], SEQ_LEN, HEADS, "bwd", blocks={"dq_atomic": 1}, **case)
  reports = mi.inspect(fn, *args)
  table = "\n".join([mi.HEADER] + [mi.format_row(_id(setting), r) for r in reports])
  assert tuple(r.name for r in reports) == (KERNELS[0], KERNELS[2]), table
  for r in reports:
    assert r.spill_store_bytes == r.spill_load_bytes == 0, table
    assert r.smem_bytes <= mi.SMEM_LIMIT, table
  plain_fn, plain_args = mosaic_cases.fusedlm_case(
      setting["head_dim"], SEQ_LEN, HEADS, "bwd", **case)
  plain = mi.inspect(plain_fn, *plain_args)[2]
  assert reports[1].wgmma_count > plain.wgmma_count, table


def test_every_call_compiles_again(compiler):
  """JAX's caches would serve a second compile of the same function without a dump."""
  del compiler
  fn, args = mosaic_cases.fusedlm_case(64, 256, 1, "fwd")
  first, second = mi.inspect(fn, *args), mi.inspect(fn, *args)
  assert first == second and len(first) == 1


def test_kernel_under_a_mesh_axis_compiles_without_nvshmem(compiler):
  """Issue 24: inside jax.shard_map over an axis named "batch" (jax.pmap is
  jit of shard_map in JAX 0.11), forward and gradient compile for the H100.

  The kernel's own grid axis was named "batch" too: Mosaic GPU read the mesh
  axis's device index instead and linked the kernel against NVSHMEM ("Failed
  to get MOSAIC_GPU_NVSHMEM_BC_PATH" here, "NVSHMEM is not supported in XLA"
  on the GPU), and the custom VJP's cotangents lacked the inputs'
  varying-manual-axes type.
  """
  del compiler
  mesh = Mesh(np.array([mi.h100_device()]), ("batch",))
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, P("batch")))
  args = (spec((2, 256, 4, 64)), spec((2, 256, 2, 64)), spec((2, 256, 2, 64)),
          spec((2, 256), jnp.int32))

  def attention(q, k, v, ids):
    return mosaic_attention_any_device(q, k, v, causal=True, segment_ids=ids)

  def gradient(q, k, v, ids):
    loss = lambda *qkv: attention(*qkv, ids).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  for fn, out_specs in ((attention, P("batch")), (gradient, (P("batch"),) * 3)):
    sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("batch"),) * 4,
                                    out_specs=out_specs))
    sharded.trace(*args).lower(lowering_platforms=("cuda",)).compile()


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    104 bytes stack frame, 100 bytes spill stores, 108 bytes spill loads
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized
ptxas warning : Registers are spilled to local memory in function 'anonymous_mosaic_gpu_kernel'
ptxas info    : Used 255 registers, used 16 barriers, 1 bytes smem
"""
PTX = """\
  wgmma.fence.sync.aligned;
  wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;
  wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;
  wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;
  wgmma.commit_group.sync.aligned;
  cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd3, {%r2, %r3, %r4, %r5}], [%r6];
  cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd3, {%r2, %r3}], [%r6];
  cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%rd4, {%r2, %r3, %r4, %r5}], [%r7];
  cp.async.bulk.commit_group;
"""
PASSES = """\
    %1 = gpu.launch async [%0] blocks(%a, %b, %c) in (%d = %c1, %e = %x, %f = %y) threads(%g, %h, %i) in (%j = %w, %k = %c1, %l = %c1) dynamic_shared_memory_size %s {
    %2 = gpu.launch async [%0] blocks(%a, %b, %c) in (%d = %c1, %e = %c16, %f = %c8) threads(%g, %h, %i) in (%j = %c256, %k = %c1, %l = %c1) dynamic_shared_memory_size %c84056_i32 {
"""


def test_parse_reads_ptxas_ptx_and_launch():
  r = mi.parse_kernel(PTX, PTXAS_LOG, PASSES, "anonymous")
  assert (r.registers, r.spill_store_bytes, r.spill_load_bytes, r.stack_frame_bytes) == (
      255, 100, 108, 104)
  assert r.smem_bytes == 84056 + 1 and r.threads == 256
  assert r.wgmma == {"m64n128k16": 2, "m64n64k16": 1} and r.wgmma_count == 3
  assert (r.tma_loads, r.tma_stores, r.tma) == (2, 1, 3)
  assert len(r.ptxas_warnings) == 2 and "serialized" in r.ptxas_warnings[0]


def test_parse_refuses_a_log_without_registers():
  with pytest.raises(mi.InspectError, match="registers"):
    mi.parse_kernel(PTX, PTXAS_LOG.replace("Used 255 registers", "Used many"), PASSES, "k")


def test_old_jax_is_refused_with_the_version(monkeypatch):
  monkeypatch.setattr(jax, "__version__", "0.10.2")
  monkeypatch.setattr(jaxlib, "__version__", "0.10.2")
  with pytest.raises(mi.InspectError, match=r"jax 0\.10\.2 .*>= 0\.11"):
    mi.check_environment()


def test_missing_plugin_says_what_to_install(monkeypatch):
  monkeypatch.setattr(jax, "__version__", "0.11.2")
  monkeypatch.setattr(jaxlib, "__version__", "0.11.2")
  monkeypatch.setattr(mi, "PLUGINS", ("no_such_plugin_package",))
  with pytest.raises(mi.InspectError,
                     match=r"pip install --no-deps jax-cuda13-plugin==0\.11\.2"
                           r" jax-cuda13-pjrt==0\.11\.2"):
    mi.check_environment()


FWD_OVERLAP = [  # tuning step M8, with the variants that enter the softmax
    dict(PLAIN, head_dim=64, causal=True, segments=True, group=4),
    dict(PLAIN, head_dim=128),
    dict(PLAIN, head_dim=128, causal=True, variants=("dropout",)),
    dict(PLAIN, head_dim=128, causal=True, variants=("bias",), bias_dtype="float32"),
    dict(PLAIN, head_dim=64, v_head_dim=128, variants=("window", "lse")),
    dict(PLAIN, head_dim=256, causal=True, variants=("dropout", "softcap")),
]


@pytest.mark.parametrize("setting", FWD_OVERLAP, ids=_id)
def test_fwd_overlap_pipelines_the_forward_without_spills(compiler, setting):
  # S of one key tile and PV of the one before in one wgmma pipeline stage:
  # no spills, and no serialised wgmma (ptxas's C7513 "non wgmma instructions
  # defining input registers", had P been converted inside the stage).
  del compiler
  # The call's default tiles (64 keys past D = 128 or with a wide bias), plus M8.
  bias_bytes = jnp.dtype(setting["bias_dtype"]).itemsize if setting["bias_dtype"] else 0
  dims = Dims.padded(setting["head_dim"], setting["v_head_dim"] or setting["head_dim"],
                     jnp.dtype(jnp.float16).itemsize, bias_bytes)
  blocks = dict(dataclasses.asdict(MosaicBlockSizes.get_default(dims)), fwd_overlap=1)
  fn, args = mosaic_cases.fusedlm_case(
      setting["head_dim"], SEQ_LEN, HEADS, "fwd", blocks=blocks,
      causal=setting["causal"], segments=setting["segments"], group=setting["group"],
      variants=setting["variants"], v_head_dim=setting["v_head_dim"],
      bias_dtype=setting["bias_dtype"])
  (r,) = mi.inspect(fn, *args)
  table = "\n".join([mi.HEADER, mi.format_row(_id(setting), r)])
  assert r.name == KERNELS[0], table
  assert r.spill_store_bytes == r.spill_load_bytes == 0, table
  assert r.smem_bytes <= mi.SMEM_LIMIT, table
  assert not r.ptxas_warnings, table
