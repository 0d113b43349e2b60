"""The device attention is resolved and checked for: the default one, or a named target.

`dot_product_attention` picks "auto"'s implementation and refuses what a
device cannot run by asking `current_device()`: the first device of JAX's
default backend, unless a `target_device(device)` context names another one
while the call is traced. That context is how the kernels are compiled for
a GPU the machine does not have (`kernels.bench.mosaic_compile.h100_device()`,
a compile-only H100: the whole train step of a model lowered for sm_90a on a
CPU machine) and how tests put the rule before a device of any kind (any
object with `platform`, `device_kind` and, for a GPU, `compute_capability`).

Resolution happens when a call is traced, so the context must be open around
the tracing (jit caches a traced program, with what it resolved to then).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax

_TARGET: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fusedlm_attention_target", default=None)


@contextlib.contextmanager
def target_device(device):
  """Resolves and checks attention calls traced inside for `device`."""
  token = _TARGET.set(device)
  try:
    yield device
  finally:
    _TARGET.reset(token)


def current_device():
  """The innermost `target_device`, else the default backend's first device."""
  device = _TARGET.get()
  return jax.devices()[0] if device is None else device


def is_gpu(device) -> bool:
  """An NVIDIA GPU (JAX's platform "gpu"; "cuda" in a compile-only topology)."""
  return getattr(device, "platform", None) in ("gpu", "cuda")


def compute_capability(device) -> str:
  """"9.0" for an H100 or H200; "" for a device that is not a GPU or does not say."""
  return str(getattr(device, "compute_capability", "") or "") if is_gpu(device) else ""


def is_hopper(device) -> bool:
  """Compute capability 9.x: wgmma, TMA and the Mosaic kernel's sm_90a."""
  return compute_capability(device).startswith("9.")


def describe(device) -> str:
  """"cpu device", "gpu device NVIDIA H200 (compute capability 9.0)", ..."""
  platform = getattr(device, "platform", "unknown")
  kind = str(getattr(device, "device_kind", ""))
  text = f"{platform} device" + (f" {kind}" if kind and kind.lower() != platform else "")
  capability = compute_capability(device)
  return f"{text} (compute capability {capability})" if capability else text
