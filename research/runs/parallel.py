"""Data-parallel plumbing for `jax.pmap`, on one process or several, kept in one place.

The trainer's pmap spans every device of the run, on every process
(`run_devices`, identical on all processes as pmap requires); the state is
replicated over them (`replicate`: each process places only its own
copies), each process splits its own share of the global batch
[per_process, ...] into [local_devices, per_device, ...] (`shard`), and
gradients are averaged with `jax.lax.pmean(..., AXIS)` inside the step, across
processes too (as Flax's examples/wmt does). Host copies are read from the
addressable shards (`unreplicate`).

Several processes (one per host) join through JAX's own runtime
(`initialize`, i.e. `jax.distributed.initialize`); `barrier` and
`check_same_config` are the few cross-process steps the trainer takes
outside the pmapped step. With one process all of it reduces to the
single-machine case.
"""

from __future__ import annotations

import hashlib
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

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

  `devices` may span several processes: the array is global, and this process
  places the copies of its own devices only. Built from per-device copies, so
  no device ever holds all of them.
  """
  devices = jax.local_devices() if devices is None else list(devices)
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  local = local_devices(devices)

  def put(x):
    x = np.asarray(x)
    copies = [jax.device_put(x[None], d) for d in local]
    return jax.make_array_from_single_device_arrays(
        (len(devices), *x.shape), sharding, copies)

  return jax.tree_util.tree_map(put, tree)


def put_batch(batch: dict, devices) -> dict:
  """This process's share of a global batch, already `shard`ed to [local devices,
  per_device, ...], placed on its devices as the pmap input over `devices`
  (a global array whose other shards live on the other processes), so that
  the transfer can happen before the step that reads it."""
  devices = list(devices)
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  local = local_devices(devices)

  def put(x):
    x = np.asarray(x)
    pieces = [jax.device_put(x[i:i + 1], d) for i, d in enumerate(local)]
    return jax.make_array_from_single_device_arrays(
        (len(devices), *x.shape[1:]), sharding, pieces)

  return jax.tree_util.tree_map(put, batch)


def local_devices(devices) -> list:
  """The members of `devices` that this process drives."""
  me = jax.process_index()
  return [d for d in devices if d.process_index == me]


def run_devices(num_devices: int | None = None) -> list:
  """The pmap devices of a run: every device of every process (the default),
  or the first `num_devices` of a single process (tests compare counts)."""
  if num_devices is None:
    return jax.devices()
  if jax.process_count() > 1:
    raise ValueError("num_devices picks devices of a single process; a multi-process"
                     " run uses every device of every process.")
  local = jax.local_devices()
  if not 1 <= num_devices <= len(local):
    raise ValueError(f"num_devices={num_devices}, but this machine has {len(local)}"
                     " local devices.")
  return local[:num_devices]


def is_primary() -> bool:
  """Process 0: the one that writes logs, run files and plots."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (no-op alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_same_config(text: str) -> None:
  """ValueError naming the processes whose run config differs from process 0's."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint32)
  digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, 2)
  differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
  if differ:
    raise ValueError(f"the processes disagree on the run config: process(es) {differ}"
                     " differ from process 0. Launch every process with the same"
                     " --config and overrides.")


def initialize(coordinator: str | None, num_processes: int | None,
               process_id: int | None, timeout_s: int = 300, auto: bool = False) -> None:
  """Joins a multi-process run (jax.distributed.initialize) before JAX starts.

  coordinator "HOST:PORT" (process 0 listens there) with num_processes and
  process_id; or auto=True for JAX's cluster detection (SLURM, Cloud TPU, ...).
  Nothing to do when neither is given. ValueError when the coordinator cannot
  be reached (or the others do not arrive) within timeout_s, or flags are missing.
  """
  if coordinator is None and not auto:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError("--num_processes / --process_id need --coordinator HOST:PORT"
                       " (or --distributed for cluster auto-detection).")
    return
  if coordinator is not None and (num_processes is None or process_id is None):
    raise ValueError("--coordinator needs --num_processes and --process_id.")
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"--process_id {process_id} is not in [0, {num_processes}).")
  if coordinator is not None and process_id != 0:
    # XLA's client aborts the whole process (a fatal C++ check) when the
    # coordinator never answers; reaching it first turns that into an error.
    _wait_for_coordinator(coordinator, process_id, num_processes, timeout_s)
  try:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
  except Exception as e:  # XLA raises its own runtime errors here
    where = f"at {coordinator}" if coordinator else "found by auto-detection"
    raise ValueError(f"could not start process {process_id} of {num_processes}: the"
                     f" coordinator {where} was not reached, or not every process"
                     f" joined, within {timeout_s} s ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from e


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



def _wait_for_coordinator(address: str, process_id, num_processes, timeout_s: float) -> None:
  """Returns once HOST:PORT accepts a TCP connection; ValueError after timeout_s."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator must be HOST:PORT, got {address!r}.")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ValueError(
            f"could not start process {process_id} of {num_processes}: the coordinator"
            f" at {address} was not reached within {timeout_s} s ({e}). Start process 0"
            " first (it hosts the coordinator) and check the address and port.") from None
      time.sleep(0.5)
