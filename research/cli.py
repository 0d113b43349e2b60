"""fusedlm: one command, a subcommand per job.

  fusedlm train --config experiments/tiny_gpt.py --workdir runs/tiny_gpt
  fusedlm evaluate --workdir runs/tiny_gpt
  fusedlm inspect mosaic --head_dims=128
  fusedlm train --help

Each subcommand is a module with a `main(argv)`, imported only when it runs
(so `fusedlm --help` starts no JAX), and also runs as
`python -m <its module>`. The table below is the one list of them.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Sequence

# Status 2 for a user's mistake, as every command exits
# (kernels.bench.command_line.USAGE_ERROR; not imported: it would import JAX).
USAGE_ERROR = 2


@dataclasses.dataclass(frozen=True)
class Command:
  module: str  # has main(argv)
  summary: str


COMMANDS = {
    "train": Command("fusedlm.research.train",
                     "train an experiment config into a workdir; resumes there"),
    "evaluate": Command("fusedlm.research.evaluate",
                        "a checkpoint's validation metrics (loss, accuracy, BLEU, EM/F1, ROUGE)"),
    "generate": Command("fusedlm.research.generate",
                        "continue prompts with a decoder run (greedy or sampled)"),
    "fill-mask": Command("fusedlm.research.fill_mask",
                         "a masked-LM run's top tokens for each [MASK] in a text"),
    "finetune": Command("fusedlm.research.finetune",
                        "fine-tune a pretrained run: classifier or extractive QA"),
    "translate": Command("fusedlm.research.translate",
                         "translate or summarize with a seq2seq run (beam search, sampling)"),
    "import-hf": Command("fusedlm.research.import_hf",
                         "a local Hugging Face BERT or GPT-2 folder as a run folder"),
    "plot": Command("fusedlm.research.plot", "loss and metric curves of a run, as PNG"),
    "bench-attention": Command("fusedlm.kernels.bench.benchmark",
                               "time the attention kernels against XLA and cuDNN"),
    "bench-train": Command("fusedlm.research.bench_train",
                           "training throughput per attention implementation vs a"
                           " plain Flax step"),
}
# `fusedlm inspect <backend>`: compile the kernels for an H100 or a TPU on any machine.
INSPECT = {
    "mosaic": Command("fusedlm.kernels.bench.mosaic_compile",
                      "the Hopper kernels (JAX >= 0.11, CUDA plugin, ptxas)"),
    "triton": Command("fusedlm.kernels.bench.triton_compile",
                      "the Triton kernels (jaxlib 0.10.2's IR, triton 3.8.0)"),
    "tpu": Command("fusedlm.kernels.bench.tpu_compile",
                   "the TPU kernels for TPU topologies (JAX >= 0.11, libtpu)"),
}


def usage() -> str:
  width = max(map(len, [*COMMANDS, "inspect"])) + 2
  lines = ["usage: fusedlm <command> [--flag=value ...]    (fusedlm <command> --help)", "",
           "commands:"]
  lines += [f"  {name:<{width}}{command.summary}" for name, command in COMMANDS.items()]
  lines.append(f"  {'inspect':<{width}}compile the kernels for an H100 or a TPU without one:"
               f" {' | '.join(INSPECT)}")
  return "\n".join(lines)


def _fail(message: str) -> None:
  print(f"fusedlm: error: {message}\n\n{usage()}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
  """The console script `fusedlm`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv:
    _fail("no command given.")
  name, rest = argv[0], argv[1:]
  if name in ("-h", "--help", "help"):
    print(usage())
    return
  if name == "inspect":
    if not rest or rest[0] in ("-h", "--help"):
      print("usage: fusedlm inspect <backend> [--flag=value ...]\n\nbackends:\n"
            + "\n".join(f"  {b:<8}{c.summary}" for b, c in INSPECT.items()))
      return
    if rest[0] not in INSPECT:
      _fail(f"unknown inspect backend {rest[0]!r}; choose {' or '.join(INSPECT)}.")
    command, rest = INSPECT[rest[0]], rest[1:]
  elif name in COMMANDS:
    command = COMMANDS[name]
  else:
    _fail(f"unknown command {name!r}.")
  importlib.import_module(command.module).main(rest)


if __name__ == "__main__":
  main()
