"""Compiles the attention kernels for an NVIDIA GPU on any machine and reports what came out.

Launch (no GPU needed; needs the `inspect` extra, see BUILD.md):

  fusedlm inspect triton                         # default settings, sm_90a (H100)
  fusedlm inspect triton --head_dims=128 --segments=on --gqa=4 \
      --blocks=block_q_dkv=64,num_warps_bwd=8 --arch=sm_80

For every setting (head dim, dtype, causal, segment ids, query heads per
key/value head, block sizes) it lowers forward + backward of
`flash_attention` for the "cuda" platform, takes the three Triton kernels
out of the lowered module (the MLIR bytecode JAX hands to XLA), compiles each
with PyPI's `triton` (TTIR -> TTGIR -> LLVM -> PTX, the passes Triton itself
runs for that target) and its bundled `ptxas -v`, and prints per kernel:
registers per thread, spill stores / loads (bytes), shared memory, and the
counts in the PTX of `wgmma` (Hopper's warpgroup matrix instruction),
`mma.sync` (the Ampere-style one), `cp.async` (asynchronous global-to-shared
copies, which is how Triton's software pipeliner overlaps the K/V loads) and
`cp.async.bulk` (TMA).

On a GPU, XLA compiles the same IR with its own copy of Triton and its own
pass pipeline: shared memory and the instruction mix agree with this report
(issue 12 compared them), registers and spill bytes can differ.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
from absl import flags

from fusedlm.kernels.bench import command_line
from fusedlm.kernels.triton import attention as triton_attention

TRITON_TARGET = "__gpu$xla.gpu.triton"
# The triton release whose MLIR reader takes the Triton IR that this jaxlib
# writes into the lowered module (found by trying: 3.6, 3.7 and 3.9 refuse
# jaxlib 0.10.2's bytecode). Newer jaxlibs compile the kernels themselves at
# lowering time and put no IR in the module.
TRITON_FOR_JAXLIB = {"0.10.2": "3.8.0"}
KERNELS = ("fusedlm_flash_fwd", "fusedlm_flash_bwd_dkv", "fusedlm_flash_bwd_dq")
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024}


class InspectError(RuntimeError):
  """The kernels cannot be compiled here; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Setting:
  """One attention problem, as the benchmark states it."""

  head_dim: int = 128
  dtype: str = "bfloat16"
  causal: bool = False
  segments: bool = False  # packed sequences (segment ids)
  group: int = 1  # query heads per key/value head (GQA)
  seq_len: int = 4096
  width: int = 2048  # num_heads * head_dim, as the benchmark's default sweep
  blocks: triton_attention.BlockSizes | None = None  # None: the default table
  dropout: float = 0.0  # attention dropout rate (its bits cost registers)

  @property
  def label(self) -> str:
    return (f"D={self.head_dim} {self.dtype} {'causal' if self.causal else 'full'}"
            f" {'seg' if self.segments else 'noseg'} gqa={self.group}"
            + (f" drop={self.dropout:g}" if self.dropout else ""))


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  """One Triton kernel as JAX lowered it: its IR and launch settings."""

  name: str
  ir: bytes  # MLIR bytecode of the Triton module
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class Report:
  """What the compiler made of one kernel."""

  name: str
  arch: str
  num_warps: int
  num_stages: int
  registers: int
  spill_stores: int  # bytes
  spill_loads: int  # bytes
  stack_frame: int  # bytes
  smem: int  # bytes of shared memory (Triton allocates it all dynamically)
  wgmma: int
  mma_sync: int
  cp_async: int
  tma: int

  @property
  def pipelined(self) -> bool:
    """Whether loads go global -> shared asynchronously (cp.async or TMA)."""
    return self.cp_async + self.tma > 0


def lower_kernels(setting: Setting) -> list[TritonKernel]:
  """The three kernels of forward + backward for `setting`, lowered for CUDA."""
  dtype = jnp.dtype(setting.dtype)
  heads = max(setting.group, setting.width // setting.head_dim)
  if heads % setting.group:
    raise ValueError(f"{heads} heads do not split into groups of {setting.group}.")
  q = jax.ShapeDtypeStruct((1, setting.seq_len, heads, setting.head_dim), dtype)
  k = jax.ShapeDtypeStruct(
      (1, setting.seq_len, heads // setting.group, setting.head_dim), dtype)
  masks = {}
  if setting.segments:
    masks["segment_ids"] = jax.ShapeDtypeStruct((1, setting.seq_len), jnp.int32)
  if setting.dropout:
    masks["dropout_rng"] = jax.ShapeDtypeStruct((2,), jnp.uint32)

  def grads(q, k, v, masks):
    def loss(q, k, v):
      out = triton_attention.flash_attention_any_device(
          q, k, v, causal=setting.causal, block_sizes=setting.blocks,
          dropout_rate=setting.dropout, **masks)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  lowered = jax.jit(grads).trace(q, k, k, masks).lower(
      lowering_platforms=("cuda",))
  found = _triton_calls(lowered.compiler_ir("stablehlo"))
  if not found:
    raise InspectError(
        f"jaxlib {jaxlib.__version__} put no Triton IR into the lowered module"
        f" (no {TRITON_TARGET!r} call); this command reads the IR of jaxlib"
        f" {', '.join(TRITON_FOR_JAXLIB)}. On a newer jaxlib, compile on a GPU"
        " and read the kernels' resource use there.")
  return found


def _triton_calls(module) -> list[TritonKernel]:
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  found = []

  def walk(op):
    for region in op.regions:
      for block in region:
        for child in block:
          if (child.name == "stablehlo.custom_call"
              and ir.StringAttr(child.attributes["call_target_name"]).value
              == TRITON_TARGET):
            config = ir.DictAttr(child.attributes["mhlo.backend_config"])
            found.append(TritonKernel(
                name=ir.StringAttr(config["name"]).value,
                ir=ir.StringAttr(config["ir"]).value_bytes,
                num_warps=ir.IntegerAttr(config["num_warps"]).value,
                num_stages=ir.IntegerAttr(config["num_stages"]).value,
            ))
          walk(child)

  walk(module.operation)
  return found


def _triton_version() -> str | None:
  try:
    return importlib.metadata.version("triton")
  except importlib.metadata.PackageNotFoundError:
    return None


def check_compiler() -> str:
  """The installed triton's version, or an InspectError that says what to install."""
  want = TRITON_FOR_JAXLIB.get(jaxlib.__version__)
  have = _triton_version()
  pairs = ", ".join(f"jaxlib {j} <-> triton=={t}" for j, t in TRITON_FOR_JAXLIB.items())
  if have is None:
    hint = (f'pip install -e ".[inspect]" (triton=={want})' if want
            else f"a jaxlib and triton pair that this command knows: {pairs}")
    raise InspectError(
        f"triton is not installed; it compiles the kernels' IR here. Install {hint}.")
  if want is None:
    raise InspectError(
        f"jaxlib {jaxlib.__version__} is not one whose Triton IR this command can"
        f" compile (installed triton {have}); known pairs: {pairs}. The Triton"
        " IR is versioned MLIR bytecode that only a matching triton reads.")
  if have != want:
    raise InspectError(
        f"triton {have} is installed, but jaxlib {jaxlib.__version__}'s Triton IR"
        f" is read by triton=={want} only (others refuse its MLIR bytecode);"
        f' pip install "triton=={want}" (the inspect extra).')
  return have


def _capability(arch: str) -> int:
  match = re.fullmatch(r"sm_(\d+)a?", arch)
  if not match:
    raise ValueError(f"--arch must look like sm_90a or sm_80, got {arch!r}.")
  return int(match.group(1))


@functools.lru_cache(maxsize=None)
def compile_kernel(kernel: TritonKernel, arch: str = "sm_90a") -> Report:
  """TTIR -> TTGIR -> LLVM -> PTX with triton, then `ptxas -v`; cached per session."""
  check_compiler()
  # pylint: disable=g-import-not-at-top
  from triton._C.libtriton import ir as tir
  from triton.backends.compiler import GPUTarget, Language
  from triton.backends.nvidia.compiler import get_ptxas
  from triton.compiler.compiler import make_backend

  capability = _capability(arch)
  backend = make_backend(GPUTarget("cuda", capability, 32))
  context = tir.context()
  tir.load_dialects(context)
  backend.load_dialects(context)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{kernel.name}.ttir")
    with open(path, "wb") as f:
      f.write(kernel.ir)
    try:
      module = tir.parse_mlir_module(path, context)
    except Exception as e:  # pylint: disable=broad-except
      raise InspectError(
          f"triton {_triton_version()} could not read the Triton IR of jaxlib"
          f" {jaxlib.__version__} ({e}); see TRITON_FOR_JAXLIB.") from e
    module.context = context
    options = backend.parse_options(
        {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages})
    stages = {}
    backend.add_stages(stages, options, Language.TRITON)
    metadata = {}
    for stage in ("ttir", "ttgir", "llir", "ptx"):
      module = stages[stage](module, metadata)
    ptx = module
    ptx_path = os.path.join(tmp, f"{kernel.name}.ptx")
    with open(ptx_path, "w") as f:
      f.write(ptx)
    # The flags Triton gives ptxas (--regAllocOptLevel=2 works around a ptxas
    # 13 bug), with -v for the resource report.
    command = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2",
               f"--gpu-name=sm_{capability}{'a' if capability >= 90 else ''}",
               ptx_path, "-o", os.path.join(tmp, "kernel.cubin")]
    result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    raise InspectError(f"ptxas failed on {kernel.name}:\n{result.stderr}")
  log = result.stderr
  number = lambda pattern: int(re.search(pattern, log).group(1))
  return Report(
      name=kernel.name, arch=arch, num_warps=kernel.num_warps,
      num_stages=kernel.num_stages,
      registers=number(r"Used (\d+) registers"),
      spill_stores=number(r"(\d+) bytes spill stores"),
      spill_loads=number(r"(\d+) bytes spill loads"),
      stack_frame=number(r"(\d+) bytes stack frame"),
      smem=metadata["shared"],
      wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
      mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
      cp_async=len(re.findall(r"\bcp\.async\.c[ag]\.shared", ptx)),
      tma=len(re.findall(r"\bcp\.async\.bulk", ptx)),
  )


def inspect(setting: Setting, arch: str = "sm_90a") -> list[Report]:
  """Compile reports of the three kernels of `setting`."""
  check_compiler()
  return [compile_kernel(kernel, arch) for kernel in lower_kernels(setting)]


HEADER = (f"{'setting':<38} {'kernel':<22} {'warps':>5} {'stages':>6} {'regs':>5}"
          f" {'spill st/ld B':>13} {'smem KiB':>8} {'wgmma':>6} {'mma.sync':>8}"
          f" {'cp.async':>8} {'tma':>4}")


def format_row(setting: Setting, report: Report) -> str:
  spills = f"{report.spill_stores}/{report.spill_loads}"
  return (f"{setting.label:<38} {report.name:<22} {report.num_warps:>5}"
          f" {report.num_stages:>6} {report.registers:>5} {spills:>13}"
          f" {report.smem / 1024:>8.1f} {report.wgmma:>6} {report.mma_sync:>8}"
          f" {report.cp_async:>8} {report.tma:>4}")


def blocks_from(items) -> dict[str, int]:
  """--blocks items "field=value" as BlockSizes overrides; ValueError names a bad one."""
  fields = {f.name for f in dataclasses.fields(triton_attention.BlockSizes)}
  out = {}
  for item in items or ():
    key, _, value = item.partition("=")
    if key not in fields or not value.strip().isdigit():
      raise ValueError(
          f"--blocks {item!r}: give field=value with an integer value and a"
          f" field of BlockSizes ({', '.join(sorted(fields))}).")
    out[key] = int(value)
  return out


_SWITCH = {"both": (False, True), "on": (True,), "off": (False,)}


def define_flags(flag_values: flags.FlagValues) -> None:
  f = dict(flag_values=flag_values)
  flags.DEFINE_list("head_dims", ["64", "128"], "comma list of head dims", **f)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                    "input dtype", **f)
  flags.DEFINE_enum("causal", "both", list(_SWITCH), "causal masking", **f)
  flags.DEFINE_enum("segments", "both", list(_SWITCH),
                    "packed sequences (segment ids)", **f)
  flags.DEFINE_list("gqa", ["1"], "query heads per key/value head, comma list"
                    " (e.g. 1,4)", **f)
  flags.DEFINE_integer("seq_len", 4096, "sequence length", lower_bound=1, **f)
  flags.DEFINE_integer("width", 2048, "num_heads * head_dim", lower_bound=1, **f)
  flags.DEFINE_list("blocks", [], "BlockSizes fields over the default table,"
                    " e.g. block_q_dkv=64,num_warps_bwd=8", **f)
  flags.DEFINE_string("arch", "sm_90a", "sm_90a (H100), sm_80 (A100), ...", **f)
  flags.DEFINE_float("dropout", 0.0, "attention dropout rate (0: none); the"
                     " default table takes other tiles with dropout",
                     lower_bound=0.0, upper_bound=0.99, **f)


def settings_from(f: flags.FlagValues) -> list[Setting]:
  """Every setting that the parsed flags `f` name."""
  overrides = blocks_from(f.blocks)
  out = []
  for head_dim in command_line.ints("head_dims", f.head_dims):
    blocks = None
    if overrides:
      blocks = dataclasses.replace(
          triton_attention.BlockSizes.get_default(head_dim, f.dtype,
                                                  dropout=f.dropout > 0),
          **overrides)
    for causal in _SWITCH[f.causal]:
      for segments in _SWITCH[f.segments]:
        for group in command_line.ints("gqa", f.gqa):
          out.append(Setting(head_dim=head_dim, dtype=f.dtype, causal=causal,
                             segments=segments, group=group,
                             seq_len=f.seq_len, width=f.width, blocks=blocks,
                             dropout=f.dropout))
  return out


def run(f: flags.FlagValues) -> None:
  """Prints the report of every setting of the parsed flags `f`.

  InspectError or ValueError when the kernels cannot be compiled here or a
  flag is bad.
  """
  settings = settings_from(f)
  version = check_compiler()
  limit = SMEM_LIMIT.get(_capability(f.arch))
  print(f"# {f.arch}; jax {jax.__version__}, jaxlib {jaxlib.__version__},"
        f" triton {version}; N={f.seq_len}, width {f.width}"
        + (f"; shared memory limit {limit // 1024} KiB" if limit else ""))
  print(HEADER)
  for setting in settings:
    for report in inspect(setting, f.arch):
      print(format_row(setting, report), flush=True)


def main(argv: list[str] | None = None) -> None:
  """`fusedlm inspect triton`; exits 2 with one line when it cannot compile here."""
  command_line.run("fusedlm inspect triton", define_flags, run, argv, doc=__doc__,
                   errors=(InspectError,))


if __name__ == "__main__":
  main()
