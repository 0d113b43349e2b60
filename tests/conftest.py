"""Test-wide set-up: fake CPU devices for pmap tests, XLA's CPU threads, hardware markers.

XLA reads XLA_FLAGS and NPROC once, when the backend starts, so both must be
set before any test imports jax.

NPROC sizes XLA's CPU thread pools (default: the cores, 2 in CI). Mosaic
GPU's interpreter runs each warpgroup of a kernel as a computation of its
own and blocks pool threads in its barrier callbacks; on two devices at once
(tests/kernels/mosaic/test_sharded.py, the pmapped train steps of
tests/research/training/test_mosaic_steps.py) eight threads wait at the same
time, and with fewer in the pool the run never ends.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("NPROC", str(max(16, os.cpu_count() or 1)))

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    # Markers, not keywords: an item's keywords also hold its folders' names
    # (every test under tests/kernels/tpu/ has the keyword "tpu").
    if item.get_closest_marker("gpu") and backend != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
    if item.get_closest_marker("tpu") and backend != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
