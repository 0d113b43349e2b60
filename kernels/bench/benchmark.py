"""Attention benchmark: our Pallas kernels against XLA, cuDNN and JAX's Triton kernel.

Launch (GPU, the default sweep; the FlashAttention papers' setting):

  fusedlm bench-attention --out=bench_out/h100

  (or `fusedlm bench-attention --out=bench_out/h100`). It sweeps bf16,
  batch * seq = 16384 tokens, heads * head_dim = 2048, head dims 64 and 128,
  seq 512 to 16384, causal and not, forward and forward+backward, over the
  implementations pallas (ours, Triton), mosaic (ours, Mosaic GPU; Hopper
  only), tpu (ours, Mosaic TPU; interpreted off TPU), xla, cudnn and jax-triton
  (`jax.experimental.pallas.ops.gpu.attention.mha`).

On a TPU the same sweep, over our TPU kernel and XLA (BENCHMARKS.md, TPU):

  fusedlm bench-attention --impls=tpu,xla --out=bench_out/tpu

Smoke run (tiny sizes; the default on a CPU, where Pallas runs interpreted):

  fusedlm bench-attention --smoke --out=/tmp/bench_smoke

Each flag narrows the sweep, e.g. `--seq_lens=4096 --head_dims=128
--passes=fwd --impls=pallas,cudnn --causal=on --reps=100`. `--variants=none,
dropout,window,softcap,bias` adds the attention variants' cells
(`kernels.bench.variant_cells`); `--impls=mosaic,mosaic:num_stages=3` puts
Mosaic kernel configurations side by side (an A/B of a tuning step in one
call). Writes a table to stdout,
`attention_bench.json` (every cell, device, JAX version, date, command) and
`attention_bench.png` (TFLOP/s against N) under --out. Method and column
meanings: `kernels.bench.measure`, `kernels.bench.report`, BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import shlex
import sys

import jax
import jaxlib
from absl import flags

from fusedlm.kernels.bench import command_line, measure, report, variant_cells

JSON_NAME = "attention_bench.json"
PNG_NAME = "attention_bench.png"


@dataclasses.dataclass(frozen=True)
class Preset:
  """Defaults of the flags left unset, by machine."""

  seq_lens: tuple[int, ...]
  head_dims: tuple[int, ...]
  tokens: int  # batch * seq_len
  width: int  # num_heads * head_dim
  reps: int
  warmup: int
  rotate_mb: float  # input sets rotate until their q, k, v exceed this
  ref_budget_mb: float  # memory the float32 error reference may take


GPU = Preset(
    seq_lens=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128),
    tokens=16384, width=2048, reps=50, warmup=5,
    rotate_mb=64,  # > the 50 MB L2 of an H100
    ref_budget_mb=8192,
)
SMOKE = Preset(
    seq_lens=(128, 256), head_dims=(64,), tokens=256, width=128, reps=3,
    warmup=1, rotate_mb=0, ref_budget_mb=256,
)


_CAUSAL = {"both": (False, True), "on": (True,), "off": (False,)}
_DTYPES = ("bfloat16", "float16", "float32")


def define_flags(flag_values: flags.FlagValues) -> None:
  """The command's flags; each narrows the sweep, unset ones take the preset."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_bool("smoke", False,
                    "tiny sizes (the default on a non-GPU backend)", **f)
  flags.DEFINE_list("seq_lens", None, "comma list, e.g. 512,1024", **f)
  flags.DEFINE_list("head_dims", None, "comma list, e.g. 64,128", **f)
  flags.DEFINE_list("dtype", None, "comma list of " + ", ".join(_DTYPES)
                    + "; default bfloat16 on GPU, float32 elsewhere", **f)
  flags.DEFINE_list("passes", list(measure.PASSES), "fwd,fwd+bwd", **f)
  flags.DEFINE_list("impls", list(measure.IMPLEMENTATIONS),
                    "comma list of " + ", ".join(measure.IMPLEMENTATIONS)
                    + "; mosaic:field=value+field=value adds the Mosaic kernel"
                    " with those MosaicBlockSizes fields (class defaults for the"
                    " rest), e.g. mosaic:num_stages=3", **f)
  flags.DEFINE_list("variants", ["none"], "comma list of "
                    + ", ".join(variant_cells.VARIANTS) + " (kernels.bench."
                    "variant_cells: dropout 0.1, a 1024-key window, soft-cap 50,"
                    " a [1, H, N, N] bias)", **f)
  flags.DEFINE_enum("causal", "both", list(_CAUSAL), "causal masking", **f)
  flags.DEFINE_integer("tokens", None, "batch * seq_len (batch >= 1)",
                       lower_bound=1, **f)
  flags.DEFINE_integer("width", None, "num_heads * head_dim", lower_bound=1, **f)
  flags.DEFINE_integer("reps", None, "timed calls per cell", lower_bound=1, **f)
  flags.DEFINE_integer("warmup", None, "untimed calls per cell", lower_bound=0,
                       **f)
  flags.DEFINE_float("rotate_mb", None,
                     "rotate input sets until q, k, v exceed this (L2)", **f)
  flags.DEFINE_float("ref_budget_mb", None,
                     "memory for the float32 reference of the error", **f)
  flags.DEFINE_bool("no_errors", False,
                    "skip the error against the float32 reference", **f)
  flags.DEFINE_integer("seed", 0, "input seed", **f)
  flags.DEFINE_string("out", "bench_out", "directory for JSON/PNG", **f)


def resolve(f: flags.FlagValues) -> dict:
  """The sweep: parsed flags, with the preset of this machine for those left unset.

  ValueError names a flag whose value is not one the sweep can take.
  """
  # A TPU takes the GPU's sweep (the FlashAttention papers' setting).
  accelerator = measure.on_gpu() or measure.on_tpu()
  preset = SMOKE if f.smoke or not accelerator else GPU
  pick = lambda flag, default: default if flag is None else flag
  dtypes = None if f.dtype is None else command_line.names("dtype", f.dtype, _DTYPES)
  return {
      "preset": "smoke" if preset is SMOKE else jax.default_backend(),
      "seq_lens": pick(command_line.ints("seq_lens", f.seq_lens), preset.seq_lens),
      "head_dims": pick(command_line.ints("head_dims", f.head_dims),
                        preset.head_dims),
      "dtypes": pick(dtypes, ("bfloat16",) if accelerator else ("float32",)),
      "passes": command_line.names("passes", f.passes, measure.PASSES),
      "implementations": _implementations(f.impls),
      "variants": command_line.names("variants", f.variants, variant_cells.VARIANTS),
      "causal": _CAUSAL[f.causal],
      "tokens": pick(f.tokens, preset.tokens),
      "width": pick(f.width, preset.width),
      "reps": pick(f.reps, preset.reps),
      "warmup": pick(f.warmup, preset.warmup),
      "rotate_mb": pick(f.rotate_mb, preset.rotate_mb),
      "ref_budget_mb": pick(f.ref_budget_mb, preset.ref_budget_mb),
      "errors": not f.no_errors,
      "seed": f.seed,
      "out": f.out,
  }


def _implementations(items) -> tuple[str, ...]:
  """--impls: names of measure.IMPLEMENTATIONS, or mosaic:field=value+..."""
  plain = [x for x in items if not x.startswith("mosaic:")]
  command_line.names("impls", plain, measure.IMPLEMENTATIONS)
  for item in items:
    measure.mosaic_blocks(item)  # ValueError names a bad configuration
  return tuple(items)


def problem_for(sweep: dict, dtype: str, head_dim: int, seq_len: int):
  """Batch and heads from the fixed token count and model width."""
  return measure.Problem(
      batch=max(1, sweep["tokens"] // seq_len), seq_len=seq_len,
      num_heads=max(1, sweep["width"] // head_dim), head_dim=head_dim,
      dtype=dtype)


def run_sweep(sweep: dict, on_cell=None) -> list[dict]:
  """Every cell of the sweep, in order; progress on stderr.

  on_cell(cells), if given, is called with the cells so far after each one.
  """
  settings = measure.Settings(
      warmup=sweep["warmup"], reps=sweep["reps"], seed=sweep["seed"],
      errors=sweep["errors"],
      ref_budget_bytes=int(sweep["ref_budget_mb"] * 2**20))
  ref_cache, cells = {}, []
  variants = sweep.get("variants", ("none",))
  total = (len(sweep["dtypes"]) * len(sweep["head_dims"]) * len(sweep["seq_lens"])
           * len(sweep["causal"]) * len(sweep["passes"]) * len(variants)
           * len(sweep["implementations"]))
  for dtype in sweep["dtypes"]:
    for head_dim in sweep["head_dims"]:
      for seq_len in sweep["seq_lens"]:
        problem = problem_for(sweep, dtype, head_dim, seq_len)
        n_sets = measure.num_input_sets(
            problem, int(sweep["rotate_mb"] * 2**20))
        input_sets = measure.make_input_sets(problem, n_sets, sweep["seed"])
        for causal, pass_, variant, impl in itertools.product(
            sweep["causal"], sweep["passes"], variants, sweep["implementations"]):
          cell = measure.measure_cell(impl, problem, causal, pass_, input_sets,
                                      settings, ref_cache, variant)
          cell["input_sets"] = n_sets
          cells.append(cell)
          _progress(cell, len(cells), total)
          if on_cell is not None:
            on_cell(cells)
        del input_sets
        ref_cache.clear()
  _progress(None, len(cells), total)
  return cells


def _progress(cell: dict | None, done: int, total: int) -> None:
  """On a terminal, one line rewritten in place per cell, erased at the end (the
  table says it all once); nothing into a log file."""
  if not sys.stderr.isatty():
    return
  if cell is None:
    sys.stderr.write("\r\033[K")
  else:
    result = (f"{cell['median_ms']:.4g} ms" if cell["status"] == "ok" else cell["status"])
    variant = "" if cell["variant"] == "none" else f" {cell['variant']}"
    sys.stderr.write(f"\r\033[Kcell {done}/{total}: {cell['label']} D={cell['head_dim']}"
                     f" N={cell['seq_len']} {'causal ' if cell['causal'] else ''}"
                     f"{cell['pass']}{variant}: {result}")
  sys.stderr.flush()


def metadata(sweep: dict, argv: list[str]) -> dict:
  device = jax.devices()[0]
  return {
      "device_kind": device.device_kind,
      "platform": device.platform,
      "device_count": jax.device_count(),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": shlex.join(["fusedlm", "bench-attention", *argv]),
      "argv": argv,
      "sweep": {k: list(v) if isinstance(v, tuple) else v
                for k, v in sweep.items()},
      "flop_formula": measure.FLOP_FORMULA,
      "memory_measure": measure.MEMORY_MEASURE,
      "timing": "median of reps calls after warmup, compile excluded; host"
                " clock around jax.block_until_ready; inputs rotated",
      "error": "||x - ref|| / ||ref|| (Frobenius), ref = reference_attention"
               " on float32-upcast inputs, batch 1, <= 2 heads, last `rows`"
               " query rows; x = out, and dq for fwd+bwd",
      "pallas_interpreted": device.platform != "gpu",
  }


def run(f: flags.FlagValues, argv: list[str]) -> None:
  """The sweep of parsed flags `f`: table on stdout, JSON and PNG under --out.

  argv: the command's arguments, recorded in the JSON. The JSON is rewritten
  after every cell with `meta.complete` false, so a sweep killed by a time
  limit (the first H200 run lost its D=128 sweep so) leaves what it measured;
  the last write sets it true.
  """
  sweep = resolve(f)
  meta = metadata(sweep, argv)
  os.makedirs(sweep["out"], exist_ok=True)
  json_path = os.path.join(sweep["out"], JSON_NAME)
  png_path = os.path.join(sweep["out"], PNG_NAME)

  def write(cells, complete: bool):
    cells = [dict(cell) for cell in cells]
    report.add_ratios(cells)
    report.write_json(json_path, {**meta, "complete": complete}, cells)
    return cells

  cells = write(run_sweep(sweep, on_cell=lambda cells: write(cells, False)), True)
  print(report.format_table(cells, meta))
  report.plot(png_path, cells, meta)
  print(f"\nwrote {json_path} and {png_path}")


def main(argv: list[str] | None = None) -> None:
  """`fusedlm bench-attention` (or `fusedlm bench-attention`).

  argv: the arguments after the command (default: sys.argv's). Exits 0, or 2
  with one line for a bad setting.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  command_line.run("fusedlm bench-attention", define_flags, lambda f: run(f, argv), argv,
                   doc=__doc__)


if __name__ == "__main__":
  main()
