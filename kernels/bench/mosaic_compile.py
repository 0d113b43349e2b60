"""Compiles Pallas Mosaic GPU kernels for the H100 (sm_90a) on any machine and reports what came out.

Launch (no GPU needed; JAX >= 0.11, its CUDA plugin and ptxas):

  pip install --no-deps jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2
  pip install "nvidia-cuda-nvcc>=13.0.48,<14"
  fusedlm inspect mosaic                      # ours, D=64,128, fwd and bwd
  fusedlm inspect mosaic --head_dims=128 --passes=bwd --causal --group=4
  fusedlm inspect mosaic --causal --variants=bias,dropout --head_dims=64,128,256
  fusedlm inspect mosaic --kernel=jax --blocks=block_kv_dkv=128  # JAX's

(ptxas: from nvidia-cuda-nvcc, or a CUDA toolkit in /usr/local/cuda or
$CUDA_ROOT; `--kernel=jax` also needs `pip install "nvidia-cuda-runtime>=13.0.48,<14"`,
because attention_mgpu asks the CUDA runtime's version while tracing.)
One forward kernel compiles in about 1-2 s on a CPU, forward + backward in 5-10 s.

`inspect(fn, *args)` jits `fn` for a compile-only H100 (a CUDA topology made
from `H100_TARGET_CONFIG`, so XLA needs no device), compiles it with
`MOSAIC_GPU_DUMP_TO` pointed at a fresh directory, and reads, per Mosaic GPU
kernel in it, what Mosaic wrote there: the PTX (`<kernel>_<n>.ptx`), the log of
`ptxas -v` (`<kernel>_<n>.ptxas`) and the MLIR pass log, whose `gpu.launch`
states the dynamic shared memory. The report per kernel: registers per
thread, spill stores / loads (bytes), shared memory, threads per block, the
`wgmma.mma_async` instructions by shape (m64n128k16 ...), the TMA copies
(`cp.async.bulk.tensor`, loads and stores) and ptxas's warnings (e.g. "wgmma
serialized"). Counts are of instructions in the PTX, not of executions.

How the dump behaves (JAX 0.11.2, measured):
  * `MOSAIC_GPU_DUMP_TO` is read at each lowering (Python side: resources,
    layout inference) and each XLA compile (C++ side: MLIR passes, PTX, ptxas
    log), so it may be set after `import jax`; the directory must exist
    (otherwise Mosaic prints everything to stdout). It turns on every dump;
    the per-kind variables (MOSAIC_GPU_DUMP_PTX, ...) do not narrow it.
  * A second lowering + compile of the same jitted function is served from
    JAX's caches and dumps nothing. `inspect` therefore traces a fresh
    wrapper of `fn` on every call (a jit cache miss; nested jits are lowered
    anew inside the new module) and turns the persistent compilation cache
    off for its compile, so that every call compiles and dumps.
  * Kernels are named after the Mosaic module: the body's __name__ or the
    mesh's `kernel_name` ("anonymous" for a functools.partial body), plus a
    process-wide counter, which orders them as they were lowered.

The CUDA plugin checks at start-up for cuDNN, cuBLAS, ... (absent on a
CPU machine) and then does not register; `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`
(or JAX_PLATFORMS=cpu) before JAX first initialises its backends avoids
that, and `inspect` registers the plugin itself when that did not happen.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
from typing import Any, Callable

import jax
import jaxlib
from absl import flags

from fusedlm.kernels.bench import command_line, mosaic_cases

MIN_JAX = (0, 11)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on sm_90 (opt-in maximum)
PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")  # jaxlib's CUDA kernels + Mosaic GPU
# --no-deps: the plugin's own requirements are the CUDA runtime libraries
# (cuDNN, cuBLAS, NCCL, ... gigabytes) that compiling does not use.
INSTALL = ("pip install --no-deps jax-cuda13-plugin=={v} jax-cuda13-pjrt=={v}"
           ' && pip install "nvidia-cuda-nvcc>=13.0.48,<14"')

# XLA's GpuTargetConfigProto for an H100 SXM (as XLA's own gpu_specs/h100_sxm.txtpb):
# what XLA would otherwise ask the attached device.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""


class InspectError(RuntimeError):
  """The kernels cannot be compiled here; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class KernelReport:
  """What Mosaic GPU + ptxas made of one kernel."""

  name: str  # the Mosaic module's name ("entry", "anonymous", a kernel_name)
  registers: int  # per thread
  spill_store_bytes: int
  spill_load_bytes: int
  stack_frame_bytes: int
  smem_bytes: int  # dynamic (the launch's) + static (ptxas's) shared memory per block
  threads: int  # per block (128 per warpgroup)
  wgmma: dict[str, int]  # wgmma.mma_async in the PTX by shape, e.g. {"m64n128k16": 4}
  tma_loads: int  # cp.async.bulk.tensor global -> shared
  tma_stores: int  # cp.async.bulk.tensor shared -> global
  ptxas_warnings: tuple[str, ...]

  @property
  def wgmma_count(self) -> int:
    return sum(self.wgmma.values())

  @property
  def tma(self) -> int:
    return self.tma_loads + self.tma_stores


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def ptxas_path() -> str:
  """The ptxas that Mosaic GPU runs: in JAX's CUDA root, as jax.experimental.mosaic.gpu sets it.

  That root is $CUDA_ROOT, else pip's nvidia-cuda-nvcc (nvidia/cu13 or
  nvidia/cuda_nvcc), else /usr/local/cuda; PATH plays no part.
  """
  from jax._src import lib  # pylint: disable=import-outside-toplevel
  return os.path.join(getattr(lib, "cuda_path", None) or "/usr/local/cuda", "bin", "ptxas")


def check_environment() -> str:
  """The CUDA plugin's package name, or an InspectError that says what to install."""
  install = INSTALL.format(v=jaxlib.__version__)
  if _version(jax.__version__) < MIN_JAX or _version(jaxlib.__version__) < MIN_JAX:
    raise InspectError(
        f"jax {jax.__version__} / jaxlib {jaxlib.__version__}: compiling Mosaic GPU"
        f" kernels without a GPU needs jax and jaxlib >= {'.'.join(map(str, MIN_JAX))}"
        " (a compile-only CUDA topology from a target config), and this module"
        " reads the dumps of 0.11.2.")
  plugin = next((p for p in PLUGINS if importlib.util.find_spec(p)), None)
  if plugin is None:
    raise InspectError(
        f"JAX's CUDA plugin is not installed (it holds Mosaic GPU's compiler);"
        f" {install}")
  have = importlib.metadata.version(plugin.replace("_", "-"))
  if have != jaxlib.__version__:
    raise InspectError(
        f"{plugin} {have} does not match jaxlib {jaxlib.__version__}; {install}")
  ptxas = ptxas_path()
  if not os.access(ptxas, os.X_OK):
    # JAX's root reads "None" where pip's nvidia/cu13 exists without bin/ptxas
    # (the CUDA runtime alone); Mosaic then looks there, not in /usr/local/cuda.
    raise InspectError(
        f"no ptxas at {ptxas}, where Mosaic GPU looks ($CUDA_ROOT, else pip's"
        " nvidia-cuda-nvcc, else /usr/local/cuda: the first that exists); pip"
        ' install "nvidia-cuda-nvcc>=13.0.48,<14"')
  return plugin


@functools.lru_cache(maxsize=None)
def h100_device() -> Any:
  """A compile-only H100 (one device of a CUDA topology that XLA needs no GPU for)."""
  plugin = check_environment()
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  def make():
    return topologies.get_topology_desc(
        platform="cuda", topology="1x1x1", target_config=H100_TARGET_CONFIG)

  try:
    return make().devices[0]
  except NotImplementedError:
    pass  # the plugin did not register: its CUDA-library check failed at start-up
  xla_plugin = "jax_plugins.xla_cuda" + plugin.removeprefix("jax_cuda").split("_")[0]
  with _env(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1"):
    try:
      importlib.import_module(xla_plugin).initialize()
    except Exception as e:  # pylint: disable=broad-except
      raise InspectError(f"{xla_plugin} could not register ({e}).") from e
  try:
    return make().devices[0]
  except (NotImplementedError, jax.errors.JaxRuntimeError) as e:
    raise InspectError(f"no compile-only CUDA topology ({e}).") from e


@contextlib.contextmanager
def _env(**values: str):
  old = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _no_persistent_cache():
  from jax._src import config  # pylint: disable=import-outside-toplevel
  state = getattr(config, "enable_compilation_cache", None)
  return state(False) if state is not None else contextlib.nullcontext()


def compile_and_dump(fn: Callable[..., Any], args: tuple, directory: str) -> None:
  """Lowers + compiles `fn(*args)` for the compile-only H100, dumping into `directory`.

  args: pytrees of jax.ShapeDtypeStruct (or arrays), placed on that device.
  """
  device = h100_device()
  sharding = jax.sharding.SingleDeviceSharding(device)
  placed = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)

  def fresh(*a):  # a new function every call: JAX's caches would skip the compile
    return fn(*a)

  with _env(MOSAIC_GPU_DUMP_TO=directory), _no_persistent_cache():
    try:
      lowered = jax.jit(fresh).trace(*placed).lower(lowering_platforms=("cuda",))
      lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if "ptxas" in str(e).lower():
        raise InspectError(f"ptxas failed or is missing: {str(e).splitlines()[0]}") from e
      raise


_PTXAS = {
    "registers": r"Used (\d+) registers",
    "spill_store_bytes": r"(\d+) bytes spill stores",
    "spill_load_bytes": r"(\d+) bytes spill loads",
    "stack_frame_bytes": r"(\d+) bytes stack frame",
}


def _launch(passes_log: str) -> tuple[int, int]:
  """(dynamic shared memory bytes, threads per block) of the last gpu.launch in the log."""
  launches = re.findall(
      r"gpu\.launch .*threads\([^)]*\) in \(([^)]*)\) dynamic_shared_memory_size"
      r" %c(\d+)_i32", passes_log)
  if not launches:
    raise InspectError("no gpu.launch with a constant dynamic_shared_memory_size"
                       " in Mosaic's MLIR pass log (has its format changed?)")
  threads, smem = launches[-1]
  sizes = [int(x) for x in re.findall(r"= %c(\d+)\b", threads)]
  if len(sizes) != 3:
    raise InspectError(f"the block size of gpu.launch is not constant: ({threads})")
  count = 1
  for s in sizes:
    count *= s
  return int(smem), count


def parse_kernel(ptx: str, ptxas_log: str, passes_log: str, name: str) -> KernelReport:
  """One kernel's report from its PTX, its `ptxas -v` log and its MLIR pass log."""
  numbers = {}
  for field, pattern in _PTXAS.items():
    match = re.search(pattern, ptxas_log)
    if not match:
      raise InspectError(f"{name}: no {pattern!r} in the ptxas log:\n{ptxas_log}")
    numbers[field] = int(match.group(1))
  static = re.search(r"(\d+) bytes smem", ptxas_log)
  dynamic, threads = _launch(passes_log)
  shapes = re.findall(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)
  tma = re.findall(r"\bcp\.async\.bulk\.tensor\.\dd\.([a-z:]+)\.([a-z:]+)", ptx)
  return KernelReport(
      name=name, **numbers,
      smem_bytes=dynamic + (int(static.group(1)) if static else 0),
      threads=threads,
      wgmma=dict(sorted(collections.Counter(shapes).items())),
      tma_loads=sum(dst.startswith("shared") for dst, _ in tma),
      tma_stores=sum(dst == "global" for dst, _ in tma),
      ptxas_warnings=tuple(
          line.strip() for line in ptxas_log.splitlines()
          if re.search(r"warning|Performance Loss", line, re.I)),
  )


def parse_dump(directory: str) -> list[KernelReport]:
  """Reports of every kernel dumped into `directory`, in the order they were lowered."""
  found = []
  for entry in os.listdir(directory):
    match = re.fullmatch(r"(.+)_(\d+)\.ptx", entry)
    if match:
      found.append((int(match.group(2)), match.group(1), entry[:-len(".ptx")]))
  reports = []
  for _, name, base in sorted(found):
    texts = {}
    for suffix in (".ptx", ".ptxas", ".mlir-passes.log"):
      path = os.path.join(directory, base + suffix)
      if not os.path.exists(path):
        raise InspectError(f"Mosaic GPU wrote {base}.ptx but no {base}{suffix}"
                           " (did ptxas run?)")
      with open(path) as f:
        texts[suffix] = f.read()
    reports.append(parse_kernel(texts[".ptx"], texts[".ptxas"],
                                texts[".mlir-passes.log"], name))
  return reports


def inspect(fn: Callable[..., Any], *args: Any) -> list[KernelReport]:
  """Per Mosaic GPU kernel of `fn(*args)`, compiled for sm_90a: its report.

  args: jax.ShapeDtypeStructs (pytrees of them), as for `jax.jit(fn).trace`.
  Every call compiles anew (see the module docstring). InspectError when it
  cannot compile here, or when `fn` holds no Mosaic GPU kernel.
  """
  check_environment()
  with tempfile.TemporaryDirectory(prefix="mosaic_dump_") as directory:
    compile_and_dump(fn, args, directory)
    reports = parse_dump(directory)
  if not reports:
    raise InspectError("no Mosaic GPU kernel was compiled (no PTX dumped).")
  return reports


HEADER = (f"{'setting':<24} {'kernel':<24} {'thr':>4} {'regs':>5} {'spill st/ld B':>13}"
          f" {'smem KiB':>8} {'wgmma (shape x count)':<34} {'tma ld/st':>9}  warnings")


def format_row(label: str, report: KernelReport) -> str:
  spills = f"{report.spill_store_bytes}/{report.spill_load_bytes}"
  shapes = " ".join(f"{s}x{n}" for s, n in report.wgmma.items()) or "-"
  tma = f"{report.tma_loads}/{report.tma_stores}"
  return (f"{label:<24} {report.name:<24} {report.threads:>4} {report.registers:>5}"
          f" {spills:>13} {report.smem_bytes / 1024:>8.1f} {shapes:<34} {tma:>9}  "
          + ("; ".join(report.ptxas_warnings) or "-"))


# --- The command: our kernel (kernels.mosaic.attention), or JAX's own
# FlashAttention-3 (attention_mgpu) beside it for comparison.


def define_flags(flag_values: flags.FlagValues) -> None:
  f = dict(flag_values=flag_values)
  flags.DEFINE_enum("kernel", "fusedlm", ["fusedlm", "jax"], "fusedlm: ours"
                    " (kernels.mosaic.attention); jax: JAX's attention_mgpu", **f)
  flags.DEFINE_bool("causal", False, "causal mask (ours)", **f)
  flags.DEFINE_bool("segments", False, "segment ids (ours)", **f)
  flags.DEFINE_integer("group", 1, "query heads per K/V head (ours)",
                       lower_bound=1, **f)
  flags.DEFINE_list("variants", [], "ours: any of "
                    + ", ".join(mosaic_cases.VARIANTS), **f)
  flags.DEFINE_integer("v_head_dim", None, "ours: V's head dim (default: the"
                       " head dim)", lower_bound=1, **f)
  flags.DEFINE_enum("bias_dtype", None, ["float32", "float16", "bfloat16"],
                    "ours, --variants=bias: the bias's dtype (default --dtype)", **f)
  flags.DEFINE_list("head_dims", ["64", "128"], "comma list of head dims", **f)
  flags.DEFINE_integer("seq_len", 2048, "sequence length", lower_bound=64, **f)
  flags.DEFINE_integer("heads", 8, "query (= key/value) heads", lower_bound=1, **f)
  flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16"], "input dtype", **f)
  flags.DEFINE_list("passes", ["fwd", "bwd"], "fwd (forward kernel) and/or bwd"
                    " (forward + dQ + dK/dV kernels of the gradient)", **f)
  flags.DEFINE_list("blocks", [], "MosaicBlockSizes fields (ours) or"
                    " attention_mgpu.TuningConfig fields (jax), e.g."
                    " block_kv=64,block_kv_dkv=128", **f)


def blocks_from(items) -> dict[str, int]:
  """--blocks items "field=value" as TuningConfig overrides; ValueError names a bad one."""
  out = {}
  for item in items or ():
    key, _, value = item.partition("=")
    if not key.isidentifier() or not value.strip().isdigit():
      raise ValueError(f"--blocks {item!r}: give field=value with an integer value.")
    out[key] = int(value)
  return out


def run(f: flags.FlagValues) -> None:
  """Prints the report of every kernel that the parsed flags `f` name."""
  import time  # pylint: disable=import-outside-toplevel
  head_dims = command_line.ints("head_dims", f.head_dims)
  passes = command_line.names("passes", f.passes, ("fwd", "bwd"))
  blocks = blocks_from(f.blocks)
  variants = command_line.names("variants", f.variants, mosaic_cases.VARIANTS)
  plugin = check_environment()
  print(f"# sm_90a (compile-only H100); jax {jax.__version__}, {plugin}"
        f" {importlib.metadata.version(plugin.replace('_', '-'))}, {ptxas_path()};"
        f" N={f.seq_len}, heads {f.heads}, {f.dtype};"
        f" shared memory limit {SMEM_LIMIT // 1024} KiB")
  print(HEADER)
  for head_dim in head_dims:
    for which in passes:
      try:
        if f.kernel == "jax":
          fn, args = mosaic_cases.attention_mgpu_case(
              head_dim, f.seq_len, f.heads, which, f.dtype, blocks)
        else:
          fn, args = mosaic_cases.fusedlm_case(
              head_dim, f.seq_len, f.heads, which, f.dtype, causal=f.causal,
              segments=f.segments, group=f.group, blocks=blocks,
              variants=tuple(variants), v_head_dim=f.v_head_dim,
              bias_dtype=f.bias_dtype)
      except TypeError as e:
        raise ValueError(f"--blocks: {e}") from e
      start = time.perf_counter()
      reports = inspect(fn, *args)
      seconds = time.perf_counter() - start
      label = f"D={head_dim} {which}"
      if f.kernel == "fusedlm":
        label += ((" causal" if f.causal else "") + (" seg" if f.segments else "")
                  + (f" g{f.group}" if f.group > 1 else "")
                  + (f" dv{f.v_head_dim}" if f.v_head_dim else "")
                  + "".join(f" {name}" for name in variants)
                  + (f" {f.bias_dtype}" if f.bias_dtype and "bias" in variants else ""))
      for report in reports:
        print(format_row(f"{label} ({seconds:.1f}s)", report), flush=True)


def main(argv: list[str] | None = None) -> None:
  """`fusedlm inspect mosaic`; exits 2 with one line when it cannot compile here."""
  # The CUDA plugin's start-up check looks for cuDNN & co., absent on a CPU
  # machine; skipping it lets the plugin register (it is read at start-up).
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  command_line.run("fusedlm inspect mosaic", define_flags, run, argv, doc=__doc__,
                   errors=(InspectError,))


if __name__ == "__main__":
  main()
