"""fusedlm evaluate: a saved checkpoint's validation loss and perplexity, MLM / NSP
accuracy, a fine-tuned classifier's accuracy and macro-F1, or a seq2seq run's BLEU.

  fusedlm evaluate --workdir runs/tiny_gpt
  fusedlm evaluate --workdir runs/tiny_gpt --step 200 --data notes/*.txt
  fusedlm evaluate --workdir runs/topics --data reviews_test.csv

The model, tokenizer and data settings come from the workdir; only the
parameters are restored, on as many devices as this machine has (or
--num_devices). The metrics (research.training.eval_loop says which) are
printed and written as JSON to --output, by default
DIR/eval/step_<N>[-<data>].json; a seq2seq run's hypotheses go beside it, one
a line, in step_<N>.hypotheses.txt. The output also names the attention
implementation each layer resolved to ("auto" per call), and why.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from absl import flags

from fusedlm.research import objectives
from fusedlm.research.runs import command_line
from fusedlm.research.training.eval_loop import evaluate_run

EVAL_DIR = "eval"


def default_output(workdir, step: int, data: str | None) -> Path:
  """DIR/eval/step_<N>.json, or step_<N>-<data name>.json for other data."""
  suffix = ""
  if data is not None:
    suffix = "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data).name.replace("*", "all"))
  return Path(workdir) / EVAL_DIR / f"step_{step}{suffix}.json"


def _write_lines(lines, path: Path) -> Path:
  """One line each, atomically (as command_line.write_json writes JSON)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
  partial.write_text("".join(line.replace("\n", " ") + "\n" for line in lines),
                     encoding="utf-8")
  os.replace(partial, path)
  return path


def format_metrics(result: dict) -> str:
  m = result["metrics"]
  objective = objectives.get(result["objective"])
  lines = [f"{result['workdir']} step {result['step']} ({objective.name}) on"
           f" {result['data']}: {m['batches']} batches, {m['tokens']:.0f}"
           f" {objective.count_unit}"]
  lines += result.get("attention", [])
  for key in objective.report_keys:
    if key in m:
      lines.append(f"  {key:<13}{m[key]:.4f}")
  return "\n".join(lines)



def define_flags(fv: flags.FlagValues) -> None:
  f = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "the run folder (config.json, tokenizer/, checkpoints/)",
                      required=True, **f)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", **f)
  flags.DEFINE_string("data", None, "other evaluation data (default: the run's validation"
                      " split)", **f)
  flags.DEFINE_integer("num_devices", None, "local devices to use (default: all)", **f)
  flags.DEFINE_integer("batch_size", None, "global batch (default: the run's"
                       " train.batch_size)", **f)
  flags.DEFINE_integer("max_batches", None, "evaluate only this many batches", **f)
  flags.DEFINE_string("output", None, "JSON file (default: DIR/eval/step_<N>.json)", **f)


def _main(f: flags.FlagValues) -> None:
  result = evaluate_run(f.workdir, step=f.step, data=f.data, num_devices=f.num_devices,
                        batch_size=f.batch_size, max_batches=f.max_batches)
  output = Path(f.output) if f.output else default_output(f.workdir, result["step"], f.data)
  outputs = result.pop("outputs", {})
  written = [_write_lines(lines, output.with_suffix(f".{name}.txt"))
             for name, lines in outputs.items()]
  command_line.write_json(result, output)
  print(format_metrics(result))
  print(f"written to {output}" + "".join(f", {path}" for path in written))


def main(argv=None) -> None:
  command_line.run("fusedlm evaluate", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
