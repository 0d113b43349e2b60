"""fusedlm evaluate: a saved checkpoint's validation loss and perplexity, MLM / NSP
accuracy, a fine-tuned classifier's accuracy and macro-F1, a QA run's exact match
and F1, or a seq2seq run's BLEU (ROUGE for summarization).

  fusedlm evaluate --workdir runs/tiny_gpt
  fusedlm evaluate --workdir runs/tiny_gpt --step 200 --data notes/*.txt
  fusedlm evaluate --workdir runs/topics --data reviews_test.csv
  fusedlm evaluate --workdir runs/squad --data dev-v1.1.json

The model, tokenizer and data settings come from the workdir; only the
parameters are restored, on as many devices as this machine has (or
--num_devices). The metrics (research.training.eval_loop says which) are
printed and written as JSON to --output, by default
DIR/eval/step_<N>[-<data>].json; a seq2seq run's hypotheses go beside it, one
a line, in step_<N>.hypotheses.txt, and a QA run's answers in the official
SQuAD predictions.json format in step_<N>.predictions.json (with
step_<N>.null_odds.json for SQuAD 2.0 data, the official script's
--na-prob-file). The output also names the attention implementation each
layer resolved to ("auto" per call), and why.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from fusedlm.research.runs import command_line
from fusedlm.research.training.eval_loop import evaluate_run

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
  output = (Path(f.output) if f.output
            else command_line.evaluation_path(f.workdir, result["step"], f.data))
  written = command_line.write_evaluation(result, output)
  print(command_line.format_evaluation(result))
  print("written to " + ", ".join(map(str, written)))


def main(argv=None) -> None:
  command_line.run("fusedlm evaluate", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
