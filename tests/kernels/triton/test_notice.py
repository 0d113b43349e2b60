"""JAX >= 0.11's deprecation of Pallas' Triton backend: one notice of ours, never an error.

JAX warns (DeprecationWarning) on every lowering of every Pallas-Triton
kernel; `kernels.triton.notice` hides that message and warns once per
process with `kernels.TritonBackendNotice`, saying what it means for a user.
"""

import subprocess
import sys
import warnings

import jax
import pytest

from fusedlm.kernels import TritonBackendNotice
from fusedlm.kernels.triton import notice as triton_notice

JAX_MESSAGE = (
    "The Pallas Triton backend is deprecated and will be removed in a future JAX"
    " version. To keep using Pallas on GPU, please migrate to the Mosaic GPU"
    " backend. To keep using Triton, switch to the official Triton bindings"
    " and jax_triton.")


def test_notice_is_shown_once_on_jax_0_11(monkeypatch):
  monkeypatch.setattr(triton_notice, "_noticed", False)
  monkeypatch.setattr(jax, "__version_info__", (0, 11, 2))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
      triton_notice.notice_once()
  notices = [w for w in caught if issubclass(w.category, TritonBackendNotice)]
  assert len(notices) == 1, [str(w.message) for w in caught]
  text = str(notices[0].message)
  for phrase in ("implementation='pallas'", "nothing to change now",
                 "implementation='cudnn'", "implementation='xla'",
                 "kernels.TritonBackendNotice"):
    assert phrase in text


def test_no_notice_before_jax_0_11(monkeypatch):
  monkeypatch.setattr(triton_notice, "_noticed", False)
  monkeypatch.setattr(jax, "__version_info__", (0, 10, 2))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    triton_notice.notice_once()
  assert not caught


@pytest.mark.parametrize("module", ["jax._src.pallas.pallas_call",
                                    "fusedlm.kernels.triton.attention",
                                    "fusedlm.research.models"])
def test_jax_deprecation_is_not_an_error_under_the_suite_filters(module):
  # pyproject's filterwarnings turn DeprecationWarnings from kernels.* and
  # research.* into errors; JAX's message about its Triton backend is
  # ignored wherever it is attributed, here under the suite's own filters.
  with warnings.catch_warnings(record=True) as caught:
    warnings.warn_explicit(JAX_MESSAGE, DeprecationWarning, "x.py", 1,
                           module=module)
  assert not caught


def test_the_library_hides_jax_message_outside_pytest_too():
  # A fresh interpreter that shows every DeprecationWarning (-W default):
  # after `import kernels`, JAX's message is gone; other warnings are not.
  code = (
      "import warnings, kernels\n"
      f"warnings.warn_explicit({JAX_MESSAGE!r}, DeprecationWarning, 'x.py', 1,"
      " module='jax._src.pallas.pallas_call')\n"
      "warnings.warn_explicit('another', DeprecationWarning, 'y.py', 2,"
      " module='jax._src.other')\n")
  result = subprocess.run([sys.executable, "-W", "default", "-c", code],
                          capture_output=True, text=True, check=True)
  assert "Pallas Triton backend" not in result.stderr
  assert "another" in result.stderr
