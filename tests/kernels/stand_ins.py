"""Stand-in devices for the "auto" rule (kernels.target reads only these attributes).

`mosaic_jax` resolves as a JAX that runs the Mosaic kernel (>= 0.11) would,
so that the rule for a Hopper GPU is checked in CI's first pass (JAX 0.10.2)
too; there, without the fixture, "auto" keeps to "pallas".
"""

import types

import pytest

from fusedlm.kernels import attention

H100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3",
                             compute_capability="9.0")
H200 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200",
                             compute_capability="9.0")
A100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB",
                             compute_capability="8.0")
CPU = types.SimpleNamespace(platform="cpu", device_kind="cpu")
TPU = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")


@pytest.fixture
def mosaic_jax(monkeypatch):
  monkeypatch.setattr(attention, "_jax_runs_mosaic", lambda: True)
