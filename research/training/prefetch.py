"""The next training batches, built and put on the devices while the current step runs.

  batches = Prefetcher(lambda step: data.train.batch(step), range(start, end), devices)
  for step in range(start, end):
    state, sums = p_train(state, batches.get(step))
  batches.close()

Without it the loop assembles each batch on the host (gather windows, pack,
shard) and transfers it between device steps, and the devices wait for both.
A background thread keeps `depth` batches ready on the devices instead; the
batches are those of `batch(step)`, a pure function of the step, in order, so
a prefetched run trains on exactly the batches of an unprefetched one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

from fusedlm.research.runs import parallel

_DONE = object()


class Prefetcher:
  """Batches of `steps`, in order, each as the pmap input over `devices`."""

  def __init__(self, make_batch: Callable[[int], dict], steps: Sequence[int], devices,
               depth: int = 2):
    self._steps = list(steps)
    self._devices = list(devices)
    self._local = len(parallel.local_devices(self._devices))
    self._make_batch = make_batch
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, name="fusedlm-prefetch",
                                    daemon=True)
    self._thread.start()

  def _fill(self) -> None:
    try:
      for step in self._steps:
        host = parallel.shard(self._make_batch(step), self._local)
        item = (step, parallel.put_batch(host, self._devices))
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
    except BaseException as e:  # pylint: disable=broad-except
      self._queue.put((None, e))  # raised in the training loop, where it belongs
      return
    self._queue.put((None, _DONE))

  def get(self, step: int) -> dict:
    """The batch of `step`, the next one in order."""
    got, item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    if item is _DONE or got != step:
      raise RuntimeError(f"prefetch out of order: asked for step {step}, got {got}")
    return item

  def close(self) -> None:
    """Stops the thread (the loop ends early, or is done)."""
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get_nowait()
      except queue.Empty:
        pass
      self._thread.join(timeout=0.1)
