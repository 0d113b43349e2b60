"""The Mosaic kernel inside jax.pmap and jax.shard_map: values and gradients on 2 devices.

Under a mesh axis two things broke the kernel (issue 24): its grid axis
"batch" resolved to the mesh's axis of that name (the device index, and an
NVSHMEM link), and the custom VJP's cotangents lacked the inputs'
varying-manual-axes type, which `jax.shard_map` checks. Here both run in
Mosaic GPU's interpreter on two fake CPU devices, with the batch sharded
over an axis named "batch" as the trainer names it, and must agree with the
float32 reference per shard. (Compiling the same for the H100:
tests/kernels/bench/test_mosaic_compile.py.)

The interpreter blocks XLA's CPU threads in its callbacks: tests/conftest.py
sizes XLA's thread pools (NPROC) so that two devices' kernels fit.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fusedlm.kernels import MosaicBlockSizes, dot_product_attention
from tests.kernels.attention_cases import (
  TOLERANCE,
  Case,
  assert_close,
  make_inputs,
  reference_output_and_grads,
)
from tests.kernels.mosaic import interpreter_shim as mosaic_interpret

pytestmark = pytest.mark.skipif(
    not mosaic_interpret.SUPPORTED, reason=mosaic_interpret.REASON)

AXIS = "batch"  # research.runs.parallel.AXIS: the name that collided
SMALL = MosaicBlockSizes(block_q=64, block_kv=64, block_q_dq=64, block_kv_dq=64,
                         block_q_dkv=64, block_kv_dkv=64)
# Two rows, one a device: packed segments, causal, GQA 2:1, a padded tail.
CASE = Case(batch=2, q_len=70, kv_len=70, heads=2, kv_heads=1, head_dim=64,
            causal=True, masks="segments", dtype=jnp.bfloat16)


def _loss_and_grads(q, k, v, cotangent, segment_ids, blocks=SMALL):
  """<attention(q, k, v), cotangent> and its gradients, through the entry point."""
  def loss(q, k, v):
    out = dot_product_attention(
        q, k, v, causal=CASE.causal, segment_ids=segment_ids,
        implementation="mosaic", block_sizes=blocks,
        interpret=mosaic_interpret.PARAMS)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def _expected():
  q, k, v, cotangent, masks = make_inputs(CASE, seed=11)
  ref_out, ref_grads = reference_output_and_grads(CASE, q, k, v, cotangent, masks)
  ref_loss = np.sum(ref_out * np.asarray(cotangent, np.float32), axis=(1, 2, 3))
  return (q, k, v, cotangent, masks["segment_ids"]), ref_loss, ref_grads


def _check(loss, grads, ref_loss, ref_grads):
  out_tol, grad_tol = TOLERANCE[CASE.dtype]
  # A row's loss sums 70 x 2 x 64 products: held to the output tolerance per term.
  np.testing.assert_allclose(np.asarray(loss).reshape(-1), ref_loss,
                             atol=out_tol * np.abs(ref_loss).max(), rtol=0)
  for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert_close(np.asarray(grad, np.float32).reshape(ref.shape), ref, grad_tol, name)


def _two_devices():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py fakes 8 CPU devices)")
  return jax.devices()[:2]


# Both backward layouts: the dQ kernel, and dQ added up by the dK/dV kernel
# into a jax.new_ref (tuning step M5), which must work per device too.
BLOCKS = {"dq_kernel": SMALL, "dq_atomic": dataclasses.replace(SMALL, dq_atomic=1)}


@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_pmap_over_an_axis_named_batch(blocks):
  devices = _two_devices()
  args, ref_loss, ref_grads = _expected()
  per_device = [x[:, None] for x in args]  # [devices, 1 row, ...]
  with mosaic_interpret.mosaic_interpreter(force=False):
    loss, grads = jax.pmap(functools.partial(_loss_and_grads, blocks=BLOCKS[blocks]),
                           axis_name=AXIS, devices=devices)(*per_device)
    loss, grads = jax.block_until_ready((loss, grads))
  _check(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_shard_map_checks_the_varying_axes_of_the_gradients(blocks):
  mesh = jax.sharding.Mesh(np.array(_two_devices()), (AXIS,))
  args, ref_loss, ref_grads = _expected()
  sharded = [jax.device_put(x, NamedSharding(mesh, PartitionSpec(AXIS))) for x in args]

  def per_shard(*shard):
    loss, grads = _loss_and_grads(*shard, blocks=BLOCKS[blocks])
    return loss[None], grads
  # check_vma is on by default: a cotangent typed unlike its input is refused.
  step = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=PartitionSpec(AXIS),
                               out_specs=PartitionSpec(AXIS)))
  with mosaic_interpret.mosaic_interpreter(force=False):
    loss, grads = jax.block_until_ready(step(*sharded))
  _check(loss, grads, ref_loss, ref_grads)
