"""Test-wide set-up: fake CPU devices for pmap tests, and hardware markers.

XLA reads XLA_FLAGS once, when the backend starts, so the fake devices must
be requested before any test imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
