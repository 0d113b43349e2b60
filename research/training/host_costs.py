"""The trainer's host-side work per step, timed: what the devices wait for when it is not hidden.

  costs = host_costs(data.train.batch, devices, steps=range(20))

`research.training.loop` does, per step, on the host: assemble the step's
batch (`batch(step)`: the objective's pipeline, gathering windows of the
token store, packing, masking), split it per device (`parallel.shard`), put
it on the devices (`parallel.put_batch`), dispatch the step, and fetch the
previous step's metric sums to host floats. The first three run on the
prefetch thread (`research.training.prefetch`) while the devices run earlier
steps, and the metrics are fetched one step late, so none of them stalls the
devices unless it takes longer than a device step. This module times each
part on this machine, per step (median and worst over `steps`), so that the
claim can be checked against a step's time (`fusedlm bench-train` prints
both).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np

from fusedlm.research import objectives
from fusedlm.research.runs import parallel

PARTS = ("batch", "shard", "transfer", "metrics")


def host_costs(make_batch: Callable[[int], dict], devices, steps: Iterable[int]) -> dict:
  """{part: {"median_ms", "max_ms"}} for PARTS, and "total_median_ms".

  make_batch: step -> the global batch (as the loop's data.train.batch).
  The transfer is timed until the arrays are on the devices; the metrics as
  the loop fetches them, from device scalars of a step's metric sums.
  """
  devices = list(devices)
  local = len(parallel.local_devices(devices))
  times: dict[str, list[float]] = {part: [] for part in PARTS}
  for step in steps:
    start = time.perf_counter()
    batch = make_batch(step)
    after_batch = time.perf_counter()
    host = parallel.shard(batch, local)
    after_shard = time.perf_counter()
    jax.block_until_ready(parallel.put_batch(host, devices))
    after_transfer = time.perf_counter()
    sums = _device_sums(batch, local, devices)
    before_metrics = time.perf_counter()
    objectives.summarize({k: float(v) for k, v in parallel.unreplicate(sums).items()})
    end = time.perf_counter()
    for part, seconds in zip(PARTS, (after_batch - start, after_shard - after_batch,
                                     after_transfer - after_shard, end - before_metrics)):
      times[part].append(seconds * 1e3)
  if not times["batch"]:
    raise ValueError("host_costs needs at least one step")
  record = {part: {"median_ms": statistics.median(values), "max_ms": max(values)}
            for part, values in times.items()}
  record["total_median_ms"] = sum(record[part]["median_ms"] for part in PARTS)
  record["steps"] = len(times["batch"])
  return record


def _device_sums(batch: dict, local: int, devices) -> dict:
  """A step's metric sums as the pmapped step returns them: one float32
  scalar per key, replicated [local devices] on the devices (values from
  the batch, so the fetch is of real, finished arrays)."""
  count = float(np.asarray(batch.get("loss_mask", batch["inputs"])).size)
  host = {"loss_sum": np.full((local,), 2.5 * count, np.float32),
          "correct": np.full((local,), 0.25 * count, np.float32),
          "count": np.full((local,), count, np.float32)}
  return jax.block_until_ready(parallel.put_batch(host, devices))
