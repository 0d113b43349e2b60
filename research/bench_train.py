"""fusedlm bench-train: training throughput per attention implementation, beside a plain Flax step.

  fusedlm bench-train                       # experiments/gpt2_small.py, batch 12 x 1024
  fusedlm bench-train --impls=mosaic,pallas,xla,auto --timed_steps=20 \\
      --output=benchmarks/h200/train_gpt2_small.json
  fusedlm bench-train --config=experiments/tiny_gpt_synthetic.py:runlocal --batch_size=4 \\
      --impls=xla --warmup_steps=1 --timed_steps=2          # a CPU smoke run, seconds

Runs the experiment config's model on its own data pipeline's batches
(nanoGPT bench.py's setting by default: GPT-2 small at batch 12 x 1024) for
--warmup_steps untimed and --timed_steps timed steps: the trainer's step once
per implementation in --impls, and the simplest Flax step on the same model
and batches (jit, AdamW without clipping, no packing, cuDNN attention on a
GPU) as the reference. Prints a table of ms/step, tokens/s, MFU (nanoGPT's
6 N + 12 L H Dh T against the device's dense bf16 peak), the compiled step's
peak device memory and FLOPs and the ratio to the reference, and the
trainer's host-side work per step (batch assembly, sharding, transfer,
metric fetch: --host_steps), and writes the same as JSON to --output (one
row per implementation, the reference row marked).

  fusedlm bench-train --compile_for=h100 --impls=mosaic,xla   # on a CPU machine

compiles the steps for a compile-only H100 instead (JAX >= 0.11 with the
CUDA plugin and ptxas, as CI's second pass installs): the compiled peak
memory and FLOPs of each step, nothing run.
What each column means: research.training.throughput.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from fusedlm.kernels import IMPLEMENTATIONS
from fusedlm.kernels.bench import mosaic_compile
from fusedlm.research.runs import command_line
from fusedlm.research.training import throughput

# The checkout's experiments/ (an editable install, as BUILD.md sets up).
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "experiments" / "gpt2_small.py")
DEFAULT_BATCH = 12  # nanoGPT bench.py's batch at block 1024


def define_flags(fv: flags.FlagValues) -> None:
  f = dict(flag_values=fv)
  command_line.define_config_flag(
      fv, "experiment config file (path.py or path.py:runlocal)", default=DEFAULT_CONFIG)
  flags.DEFINE_integer("batch_size", DEFAULT_BATCH, "rows per step (overrides"
                       " config.train.batch_size)", lower_bound=1, **f)
  flags.DEFINE_integer("seq_len", None, "tokens per row (default: config.data.seq_len)",
                       lower_bound=2, **f)
  flags.DEFINE_list("impls", list(throughput.DEFAULT_IMPLEMENTATIONS),
                    f"attention implementations to time, of {', '.join(IMPLEMENTATIONS)}",
                    **f)
  flags.DEFINE_integer("warmup_steps", 3, "untimed steps first (the compile)",
                       lower_bound=1, **f)
  flags.DEFINE_integer("timed_steps", 10, "timed steps", lower_bound=1, **f)
  flags.DEFINE_integer("host_steps", 20, "steps over which the trainer's host-side work"
                       " is timed (research.training.host_costs); 0 = none", lower_bound=0,
                       **f)
  flags.DEFINE_enum("compile_for", None, ["h100"], "compile the steps for a compile-only"
                    " device instead of running them (h100: kernels.bench.mosaic_compile's,"
                    " JAX >= 0.11 with the CUDA plugin and ptxas): compiled memory and"
                    " FLOPs, no timings", **f)
  flags.DEFINE_list("drop_fields", [], "batch fields to remove before the steps, to"
                    " measure what one saves (mlm_positions: the MLM head over every"
                    " position)", **f)
  flags.DEFINE_string("output", "bench_train.json", "JSON file of the results", **f)


def _main(f: flags.FlagValues) -> None:
  unknown = [name for name in f.impls if name not in IMPLEMENTATIONS]
  if unknown or not f.impls:
    raise ValueError(f"--impls: unknown implementation(s) {unknown}; choose from"
                     f" {', '.join(IMPLEMENTATIONS)}.")
  config = f.config
  config.train.batch_size = f.batch_size
  if f.seq_len is not None:
    config.data.seq_len = f.seq_len
  device = None
  if f.compile_for == "h100":
    try:
      device = mosaic_compile.h100_device()
    except mosaic_compile.InspectError as e:
      raise ValueError(f"--compile_for=h100: {e}") from e
  result = throughput.benchmark_training(
      config, implementations=tuple(f.impls), warmup_steps=f.warmup_steps,
      timed_steps=f.timed_steps, device=device, compile_only=device is not None,
      host_steps=f.host_steps, drop_fields=tuple(f.drop_fields))
  result = {"config": f["config"].config_filename, **result}
  print(throughput.format_table(result))
  print(f"written to {command_line.write_json(result, f.output)}")


def main(argv=None) -> None:
  command_line.run("fusedlm bench-train", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
