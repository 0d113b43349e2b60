"""Data-parallel plumbing for `jax.pmap`, kept in one place.

The trainer replicates its state over the local devices, splits each host
batch [global_batch, ...] into [devices, per_device, ...], and averages
gradients with `jax.lax.pmean(..., AXIS)` inside the step (as Flax's
examples/wmt does).
"""

from __future__ import annotations

import jax
import numpy as np

AXIS = "batch"  # the pmap axis name the train step reduces over


def shard(batch: dict, num_devices: int | None = None) -> dict:
  """Splits every array [global_batch, ...] into [devices, per_device, ...]."""
  n = jax.local_device_count() if num_devices is None else num_devices
  def split(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(
          f"the batch size {x.shape[0]} is not divisible by the {n} local"
          " devices; choose train.batch_size as a multiple of the device count."
      )
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])
  return jax.tree_util.tree_map(split, batch)


def replicate(tree, devices=None):
  """One copy of a pytree per device (leading device axis); default: all local.

  Built from per-device copies, so no device ever holds all of them.
  """
  devices = jax.local_devices() if devices is None else list(devices)
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))

  def put(x):
    x = jax.numpy.asarray(x)
    copies = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays(
        (len(devices), *x.shape), sharding, copies)

  return jax.tree_util.tree_map(put, tree)


def unreplicate(tree):
  """One copy of a replicated pytree ([devices, ...] leaves), as numpy on the host.

  Read from the first shard this process can address (never `x[0]`, which
  gathers across devices and may touch another process's), and copied, so it
  survives the next step donating the device buffers. Checkpoints, metrics
  and evaluation all take their host copy here.
  """
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_shards[0].data)[0]
    return np.asarray(x)[0]
  return jax.tree_util.tree_map(first, tree)
