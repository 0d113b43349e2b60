"""JAX >= 0.11 deprecates Pallas' Triton backend: one notice of ours instead of JAX's many.

`import kernels` hides JAX's DeprecationWarning (it fires on every lowering
of every kernel) and `notice_once` says, once per process, what it means for
a user of the kernel.
"""

from __future__ import annotations

import warnings

import jax

# JAX >= 0.11 deprecates Pallas' Triton backend, through which this kernel is
# compiled, and says so with a DeprecationWarning on every lowering of every
# kernel (three per compiled fwd+bwd). We replace it with one notice of ours
# per process (`notice_once`), which says what it means here.
_JAX_TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"
warnings.filterwarnings("ignore", message=_JAX_TRITON_DEPRECATION,
                        category=DeprecationWarning)


class TritonBackendNotice(FutureWarning):
  """JAX deprecates the Pallas backend this kernel is compiled through."""


_noticed = False


def notice_once() -> None:
  """Warns once per process, on JAX >= 0.11, when the kernel is compiled for a GPU."""
  global _noticed
  if _noticed or jax.__version_info__ < (0, 11):
    return
  _noticed = True
  warnings.warn(
      f"JAX {jax.__version__} deprecates Pallas' Triton backend, through which"
      " fusedlm's attention kernel (implementation='pallas') is compiled on"
      " NVIDIA GPUs. It still works, with the same results, on this JAX:"
      " nothing to change now. If a later JAX removes the backend, pick"
      " implementation='cudnn' (the fastest on Hopper; bfloat16/float16, no"
      " segment ids) or implementation='xla' (every mask, but it"
      " materialises the scores). Shown once per process; silence it with"
      " warnings.filterwarnings('ignore',"
      " category=kernels.TritonBackendNotice).",
      TritonBackendNotice, stacklevel=2,
  )
