"""Fine-tunes a pretrained run: a sequence classifier, or extractive QA with a span head.

  fusedlm finetune --config experiments/finetune_topics.py \\
      --init_from runs/tiny_bert --workdir runs/topics
  fusedlm finetune --config experiments/finetune_sentiment_csv.py \\
      --init_from runs/tiny_bert --workdir runs/sentiment \\
      --config.data.task=reviews.csv --config.data.validation=reviews_test.csv
  fusedlm finetune --config experiments/finetune_qa.py \\
      --init_from runs/tiny_bert --workdir runs/stdlib_qa
  fusedlm finetune --config experiments/finetune_qa.py --init_from runs/bert_hf \\
      --workdir runs/squad --config.data.task=train-v1.1.json \\
      --config.data.validation=dev-v1.1.json --config.data.seq_len=384 \\
      --config.data.doc_stride=128 --config.data.max_query_len=64

The new model is the pretrained one (its tokenizer, architecture and weights,
from the newest checkpoint or config.init_step) with the objective's head in
place of the pretraining heads: for classification the encoder pools [CLS]
through its pooler and the decoder reads its last real token; for QA
(objective "qa", research.objectives.qa) a span head reads every position of
the encoder. It trains with research.training.loop, so the workdir is an
ordinary run: checkpoints that resume, metrics.jsonl, and an evaluation on
the held-out split (loss, accuracy, and macro-F1 or span accuracy) every
train.eval_every steps and at the end, which `fusedlm evaluate --workdir`
repeats from the checkpoint. An objective with a decoding evaluation (QA:
exact match and F1 of the answers) runs it at the end and writes it as
`fusedlm evaluate` does (DIR/eval/step_<N>.json, with predictions.json's
record beside it). Rerunning the same command resumes.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from fusedlm.research import objectives
from fusedlm.research.runs import command_line, parallel
from fusedlm.research.runs.warm_start import load_warm_start
from fusedlm.research.training import eval_loop, loop


def finetune(config, workdir, init_from: str | None = None, **train_options) -> dict:
  """Fine-tunes from `init_from` (else config.init_from); returns training.loop.train's result.

  The pretrained run's path is recorded in the new run's config.json.

  Raises:
    ValueError / FileNotFoundError: no pretrained run, a missing or unfit
      checkpoint, a bad task file, or a config error (each named).
  """
  source = init_from or config.get("init_from")
  if not source:
    raise ValueError("no pretrained run to fine-tune: pass --init_from DIR (a workdir"
                     " written by fusedlm train) or set config.init_from.")
  with config.unlocked():
    config.init_from = str(Path(source).absolute())
  step = config.get("init_step") or None  # 0: the newest checkpoint
  start = load_warm_start(source, step)
  return loop.train(config, workdir, warm_start=start, **train_options)


def define_flags(fv: flags.FlagValues) -> None:
  command_line.define_config_flag(fv, "fine-tuning config file (path.py or path.py:runlocal)")
  flags.DEFINE_string("init_from", None, "the pretrained run's workdir (or config.init_from)",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "checkpoints, logs, config.json, tokenizer",
                      flag_values=fv, required=True)
  command_line.define_distributed_flags(fv)


def _main(f: flags.FlagValues) -> None:
  command_line.start_distributed(f)
  result = finetune(f.config, f.workdir, f.init_from)
  metrics = result["eval"]
  if objectives.get(f.config.objective).extra_evaluation is None:
    print(f"held-out accuracy {metrics.get('accuracy', float('nan')):.4f}, macro-F1"
          f" {metrics.get('macro_f1', float('nan')):.4f} over"
          f" {metrics.get('tokens', 0):.0f} examples; checkpoint in"
          f" {Path(f.workdir).absolute()}")
  elif parallel.is_primary():  # decoding the split: process 0 alone, on its devices
    record = eval_loop.evaluate_run(f.workdir)
    written = command_line.write_evaluation(
        record, command_line.evaluation_path(f.workdir, record["step"]))
    print(command_line.format_evaluation(record))
    print("written to " + ", ".join(map(str, written)))


def main(argv=None) -> None:
  command_line.run("fusedlm finetune", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
