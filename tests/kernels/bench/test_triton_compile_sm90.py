"""The kernels compile for the H100 (sm_90a) without spills, and pipeline their loads.

No GPU needed: `kernels.bench.triton_compile` lowers forward + backward for CUDA, compiles
each Triton kernel to PTX with PyPI's triton and runs `ptxas -v` (see
BUILD.md, the `inspect` extra, which the `dev` extra pulls in). Checked for
every kernel and setting:

  * it compiles for sm_90a;
  * its shared memory fits the H100's 227 KiB per block;
  * no register spills (a kernel at the 255-register cap that spills to local
    memory is slow, whatever its tiles);
  * its K/V (or Q/dO) loads are asynchronous copies, `cp.async` or TMA, which
    is what Triton's software pipeliner emits when it can overlap the next
    block's loads with this block's matrix products: with segment ids too.

The grid: head dims 64, 128 and 256 x causal or not x segment ids or not, and
grouped-query heads (4 query heads per K/V head) where the dK/dV kernel
loops over the group, with and without segments; and attention dropout at
head dims 64 and 128, whose default tiles are its own.
"""

import platform

import jaxlib
import pytest

from fusedlm.kernels.bench import triton_compile as kinspect

H100_SMEM = 227 * 1024

SETTINGS = [
    kinspect.Setting(head_dim=d, causal=c, segments=s, group=1, seq_len=2048)
    for d in (64, 128, 256) for c in (False, True) for s in (False, True)
] + [
    kinspect.Setting(head_dim=d, causal=True, segments=s, group=4, seq_len=2048)
    for d in (64, 128) for s in (False, True)
] + [
    # Dropout's Philox bits: the plain tiles spilled 0.6-5 KiB a thread.
    kinspect.Setting(head_dim=d, causal=c, segments=False, group=1, seq_len=2048,
                     dropout=0.1)
    for d, c in ((64, True), (128, False))
]


@pytest.fixture(scope="module", autouse=True)
def _compiler():
  if jaxlib.__version__ not in kinspect.TRITON_FOR_JAXLIB:
    pytest.skip(f"jaxlib {jaxlib.__version__}: no triton release known to read its"
                f" Triton IR ({kinspect.TRITON_FOR_JAXLIB}); compiled on a GPU"
                " by the gpu-marked tests instead")
  if kinspect._triton_version() is None and platform.system() != "Linux":
    pytest.skip("triton has Linux wheels only")
  kinspect.check_compiler()  # on Linux a missing triton fails, with the fix


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.label.replace(" ", "_"))
def test_kernels_compile_for_sm90_without_spills_and_pipelined(setting):
  reports = kinspect.inspect(setting, arch="sm_90a")
  assert sorted(r.name for r in reports) == sorted(kinspect.KERNELS)
  problems = []
  for r in reports:
    if r.smem > H100_SMEM:
      problems.append(f"{r.name}: {r.smem} B of shared memory > {H100_SMEM}")
    if r.spill_stores or r.spill_loads:
      problems.append(f"{r.name}: spills {r.spill_stores}/{r.spill_loads} B"
                      f" (stores/loads) at {r.registers} registers")
    if not r.pipelined:
      problems.append(f"{r.name}: no cp.async or TMA in the PTX (loads not pipelined)")
  table = "\n".join([kinspect.HEADER] + [kinspect.format_row(setting, r)
                                         for r in reports])
  assert not problems, "\n".join(problems + [table])
