"""Compiles the TPU attention kernels for TPU topologies on any machine and reports what came out.

Launch (no TPU needed; JAX >= 0.11 and PyPI's libtpu):

  pip install libtpu==0.0.52
  fusedlm inspect tpu                               # v5e and v4, D=64,128,256
  fusedlm inspect tpu --topologies=v5p:2x2x1 --head_dims=128 --causal --segments
  fusedlm inspect tpu --no-vmem                     # compile only, no bisection

`jax.experimental.topologies.get_topology_desc(topology_name=..., platform=
"tpu")` describes a TPU slice without one: libtpu compiles for its devices
exactly as it would on the machine (Mosaic's own passes, its VMEM
allocation, XLA's TPU pipeline around the custom call), and nothing runs.
Each of our three kernels (forward, dQ, dK/dV; `kernels.tpu`) is jitted on
its own, from the layout `kernels.tpu.attention.prepare` makes, for device
0 of the topology. The report per kernel:

  * vmem: the smallest scoped-VMEM limit (`vmem_limit_bytes`) under which
    Mosaic compiles the kernel, found by bisection to 64 KiB; that is the
    kernel's VMEM need as the compiler counts it (blocks double-buffered by
    the pipeline, scratch, internal scratch for the [block_q, block_k]
    temporaries). Compiling with a lower limit fails with XLA's
    CompileTimeScopedVmemOom. The default problem (8 x 4096 tokens, 16
    heads) is too large for XLA to keep whole operands in VMEM: for small
    ones it does (v5e has 128 MiB), the kernel then reads them in place and
    needs no pipeline buffers, and the figure shrinks to the scratch alone.
    Beside it, our own estimate (`kernels.tpu.block_sizes.vmem_bytes`),
    which guards user tile sizes;
  * hbm: the compiled call's `memory_analysis()` (arguments + outputs + temp);
  * warnings: Python warnings, and lines libtpu logged to stderr while
    compiling (absl's W/E lines, or any line saying warning), verbatim.

One kernel compiles in about a second on a CPU; bisection costs ~8 compiles.
Several processes may compile at once (`ALLOW_MULTIPLE_LIBTPU_LOAD`, set
by `topology_devices`: libtpu's one-process lock is for a real TPU).
libtpu prints a few lines about missing TPU_* environment variables when the
first topology is made: it looks for a TPU to attach to and finds none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import os
import re
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
from absl import flags

from fusedlm.kernels.bench import command_line
from fusedlm.kernels import masking
from fusedlm.kernels.tpu.attention import kernel_tiles, prepare
from fusedlm.kernels.tpu.backward import backward_dkv, backward_dq
from fusedlm.kernels.tpu.block_sizes import (
  DEFAULT_SCOPED_VMEM,
  ROW_LANES,
  TpuBlockSizes,
  vmem_bytes,
)
from fusedlm.kernels.tpu.forward import forward

MIN_JAX = (0, 11)
LIBTPU = "libtpu==0.0.52"
TOPOLOGIES = ("v5e:2x2", "v4:2x2x1")
KERNELS = ("forward", "dq", "dkv")
VMEM_RESOLUTION = 64 * 1024
_LOG_LINE = re.compile(r"^[WE]\d{4} |warning", re.IGNORECASE)


class InspectError(RuntimeError):
  """The kernels cannot be compiled here; the message says why and what to do."""


def check_environment() -> str:
  """libtpu's version; InspectError when this JAX or libtpu cannot compile here."""
  if jax.__version_info__ < MIN_JAX:
    raise InspectError(
        f"compiling for a TPU topology needs JAX >= 0.11 with libtpu; this is"
        f" JAX {jax.__version__} (pip install 'jax==0.11.2' {LIBTPU}).")
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    raise InspectError(f"libtpu is not installed: pip install {LIBTPU}") from None


@functools.cache
def topology_devices(name: str) -> tuple:
  """The compile-only devices of a TPU topology such as "v5e:2x2"."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  check_environment()
  # libtpu takes /tmp/libtpu_lockfile so that one process owns the TPU; a
  # compile-only topology owns nothing, and parallel test workers (or two
  # users of one machine) would otherwise fail with "Internal error when
  # accessing libtpu multi-process lockfile". Read when libtpu loads.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return tuple(topologies.get_topology_desc(topology_name=name,
                                              platform="tpu").devices)
  except Exception as e:  # noqa: BLE001 - libtpu's errors name the topology
    raise ValueError(f"TPU topology {name!r}: {command_line.one_line(e)}") from e


@dataclasses.dataclass(frozen=True)
class Problem:
  """One attention call, [batch, seq_len, heads, head_dim] inputs."""

  head_dim: int
  seq_len: int = 4096
  heads: int = 16
  kv_heads: int = 16
  batch: int = 8
  dtype: str = "bfloat16"
  causal: bool = True
  segments: bool = False


@dataclasses.dataclass(frozen=True)
class KernelReport:
  """What libtpu made of one kernel for one topology."""

  topology: str
  device_kind: str
  kernel: str
  block_q: int
  block_k: int
  seconds: float  # one compile
  vmem_bytes: int | None  # smallest scoped-VMEM limit that compiles (None: not measured)
  estimate_bytes: int  # kernels.tpu.block_sizes.vmem_bytes
  hbm: dict  # memory_analysis(): argument, output, temp bytes
  warnings: tuple[str, ...]


def _kernel_fn(kernel: str, problem: Problem, blocks: TpuBlockSizes):
  """f(q, k, v, [segment ids]) running only `kernel` (the backward ones on
  stand-in dO, L and D: compiling does not read values)."""
  def f(q, k, v, *segment_ids):
    masks = {"segment_ids": segment_ids[0]} if segment_ids else {}
    qp, kp, vp, aux, st = prepare(q, k, v, causal=problem.causal,
                                  block_sizes=blocks, interpret=False, **masks)
    if kernel == "forward":
      return forward(qp, kp, vp, aux, st)
    b, h, q_pad, _ = qp.shape
    do = jnp.ones((b, h, q_pad, vp.shape[3]), qp.dtype)
    rows = jnp.zeros((b, h, q_pad, ROW_LANES), jnp.float32)
    if kernel == "dq":
      return backward_dq(qp, kp, vp, do, rows, rows, aux, st)
    return backward_dkv(qp, kp, vp, do, rows, rows, aux, st)
  return f


def _abstract_args(problem: Problem, device):
  sharding = jax.sharding.SingleDeviceSharding(device)
  p = problem
  q = jax.ShapeDtypeStruct((p.batch, p.seq_len, p.heads, p.head_dim),
                           jnp.dtype(p.dtype), sharding=sharding)
  kv = jax.ShapeDtypeStruct((p.batch, p.seq_len, p.kv_heads, p.head_dim),
                            jnp.dtype(p.dtype), sharding=sharding)
  args = [q, kv, kv]
  if p.segments:
    args.append(jax.ShapeDtypeStruct((p.batch, p.seq_len), jnp.int32,
                                     sharding=sharding))
  return args


@contextlib.contextmanager
def captured_stderr():
  """Collects what is written to file descriptor 2 (libtpu's C++ logging)
  into the yielded list, as lines, when the block ends."""
  lines: list[str] = []
  with tempfile.TemporaryFile(mode="w+") as sink:
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
      yield lines
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      sink.seek(0)
      lines.extend(sink.read().splitlines())


def compile_with_warnings(fn, *args):
  """(compiled, warnings): jit(fn) compiled for the args' devices, and the
  Python warnings and libtpu warning lines raised meanwhile."""
  with warnings.catch_warnings(record=True) as caught, captured_stderr() as log:
    warnings.simplefilter("always")
    compiled = jax.jit(fn).trace(*args).lower().compile()
  found = [f"{w.category.__name__}: {w.message}" for w in caught]
  found += [line for line in log if _LOG_LINE.search(line)]
  return compiled, tuple(found)


def _is_vmem_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text and "vmem" in text.lower()


def min_vmem_bytes(kernel: str, problem: Problem, blocks: TpuBlockSizes, device,
                   upper: int = DEFAULT_SCOPED_VMEM,
                   resolution: int = VMEM_RESOLUTION) -> int:
  """The smallest scoped-VMEM limit (a multiple of `resolution`) under which
  `kernel` compiles; `upper` must compile (it is the default limit)."""
  args = _abstract_args(problem, device)

  def compiles(limit: int) -> bool:
    limited = dataclasses.replace(blocks, vmem_limit_bytes=limit)
    try:
      jax.jit(_kernel_fn(kernel, problem, limited)).trace(*args).lower().compile()
      return True
    except Exception as e:  # noqa: BLE001 - only a VMEM shortfall is expected
      if not _is_vmem_oom(e):
        raise
      return False

  if not compiles(upper):
    raise ValueError(f"the {kernel} kernel does not fit {upper} bytes of scoped"
                     f" VMEM with {blocks}; use smaller tiles.")
  low, high = 0, upper  # low fails (nothing fits in 0 bytes), high compiles
  while high - low > resolution:
    mid = (low + high) // 2 // resolution * resolution or resolution
    if compiles(mid):
      high = mid
    else:
      low = mid
  return high


def inspect_kernels(topology: str, problem: Problem, *, vmem: bool = True,
                    blocks: TpuBlockSizes | None = None) -> list[KernelReport]:
  """Compiles the three kernels of `problem` for device 0 of `topology`."""
  device = topology_devices(topology)[0]
  blocks = blocks or TpuBlockSizes.get_default(problem.head_dim)
  args = _abstract_args(problem, device)
  p = problem
  shape = masking.AttentionShape(p.batch, p.seq_len, p.seq_len, p.heads,
                                 p.kv_heads, p.head_dim, p.head_dim)
  itemsize = jnp.dtype(p.dtype).itemsize
  reports = []
  for kernel, (bq, bk) in zip(KERNELS, kernel_tiles(blocks, shape, False)):
    start = time.perf_counter()
    compiled, found = compile_with_warnings(_kernel_fn(kernel, problem, blocks),
                                            *args)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    hbm = {} if stats is None else {
        "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
        "temp": stats.temp_size_in_bytes}
    reports.append(KernelReport(
        topology=topology, device_kind=device.device_kind, kernel=kernel,
        block_q=bq, block_k=bk, seconds=seconds,
        vmem_bytes=(min_vmem_bytes(kernel, problem, blocks, device,
                                   upper=blocks.vmem_limit_bytes or DEFAULT_SCOPED_VMEM)
                    if vmem else None),
        estimate_bytes=vmem_bytes(bq, bk, p.head_dim, p.head_dim, itemsize,
                                  kernel),
        hbm=hbm, warnings=found))
  return reports


HEADER = (f"{'topology':<10} {'device':<12} {'D':>4} {'kernel':<8} {'tiles':>9}"
          f" {'vmem KiB':>9} {'est. KiB':>9} {'compile s':>9}  warnings")


def format_row(head_dim: int, r: KernelReport) -> str:
  vmem = "-" if r.vmem_bytes is None else f"{r.vmem_bytes // 1024}"
  return (f"{r.topology:<10} {r.device_kind:<12} {head_dim:>4} {r.kernel:<8}"
          f" {f'{r.block_q}x{r.block_k}':>9} {vmem:>9} {r.estimate_bytes // 1024:>9}"
          f" {r.seconds:>9.2f}  {'; '.join(r.warnings) or 'none'}")


def define_flags(flag_values: flags.FlagValues) -> None:
  f = dict(flag_values=flag_values)
  flags.DEFINE_list("topologies", list(TOPOLOGIES), "TPU topologies, e.g."
                    " v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2", **f)
  flags.DEFINE_list("head_dims", ["64", "128", "256"], "comma list of head dims", **f)
  flags.DEFINE_integer("seq_len", 4096, "sequence length", lower_bound=1, **f)
  flags.DEFINE_integer("batch", 8, "batch size", lower_bound=1, **f)
  flags.DEFINE_integer("heads", 16, "query heads", lower_bound=1, **f)
  flags.DEFINE_integer("group", 1, "query heads per K/V head", lower_bound=1, **f)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "input dtype", **f)
  flags.DEFINE_bool("causal", True, "causal mask", **f)
  flags.DEFINE_bool("segments", False, "segment ids", **f)
  flags.DEFINE_bool("vmem", True, "bisect each kernel's VMEM need", **f)


def run(f: flags.FlagValues) -> None:
  """Prints the report of every kernel that the parsed flags `f` name."""
  head_dims = command_line.ints("head_dims", f.head_dims)
  if f.heads % f.group:
    raise ValueError(f"--heads ({f.heads}) must be a multiple of --group ({f.group}).")
  version = check_environment()
  print(f"# jax {jax.__version__}, libtpu {version}; B={f.batch}, N={f.seq_len}, heads"
        f" {f.heads} (kv {f.heads // f.group}), {f.dtype}"
        f"{', causal' if f.causal else ''}{', segments' if f.segments else ''};"
        f" default scoped VMEM {DEFAULT_SCOPED_VMEM // 2**20} MiB")
  print(HEADER)
  for topology in f.topologies:
    for head_dim in head_dims:
      problem = Problem(head_dim=head_dim, seq_len=f.seq_len, batch=f.batch,
                        heads=f.heads,
                        kv_heads=f.heads // f.group, dtype=f.dtype,
                        causal=f.causal, segments=f.segments)
      for report in inspect_kernels(topology, problem, vmem=f.vmem):
        print(format_row(head_dim, report), flush=True)


def main(argv: list[str] | None = None) -> None:
  """`fusedlm inspect tpu`; exits 2 with one line when it cannot compile here."""
  command_line.run("fusedlm inspect tpu", define_flags, run, argv, doc=__doc__,
                   errors=(InspectError,))


if __name__ == "__main__":
  main()
