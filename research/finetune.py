"""Fine-tunes a pretrained encoder or decoder as a sequence classifier.

  python -m research.finetune --config experiments/finetune_topics.py \\
      --init_from runs/tiny_bert --workdir runs/topics
  python -m research.finetune --config experiments/finetune_sentiment_csv.py \\
      --init_from runs/tiny_bert --workdir runs/sentiment \\
      --config.data.task=reviews.csv --config.data.validation=reviews_test.csv

The new model is the pretrained one (its tokenizer, architecture and weights,
from the newest checkpoint or config.init_step) with a classification head in
place of the pretraining heads: the encoder pools [CLS] through its pooler, the
decoder reads its last real token. It trains with research.train's loop, so
the workdir is an ordinary run: checkpoints that resume, metrics.jsonl, and an
evaluation on the held-out split (loss, accuracy, macro-F1) every
train.eval_every steps and at the end, which `research.evaluate --workdir`
repeats from the checkpoint. Rerunning the same command resumes.
"""

from __future__ import annotations

from pathlib import Path

from research import command_line, train
from research.warm_start import load_warm_start


def finetune(config, workdir, init_from: str | None = None, **train_options) -> dict:
  """Fine-tunes from `init_from` (else config.init_from); returns train.train's result.

  The pretrained run's path is recorded in the new run's config.json.

  Raises:
    ValueError / FileNotFoundError: no pretrained run, a missing or unfit
      checkpoint, a bad task file, or a config error (each named).
  """
  source = init_from or config.get("init_from")
  if not source:
    raise ValueError("no pretrained run to fine-tune: pass --init_from DIR (a workdir"
                     " written by research.train) or set config.init_from.")
  with config.unlocked():
    config.init_from = str(Path(source).absolute())
  step = config.get("init_step") or None  # 0: the newest checkpoint
  start = load_warm_start(source, step)
  return train.train(config, workdir, warm_start=start, **train_options)


def _main():
  from absl import flags  # Parsed in __main__ only: importing stays flag-free.
  f = flags.FLAGS
  command_line.start_distributed()
  result = finetune(f.config, f.workdir, f.init_from)
  metrics = result["eval"]
  print(f"held-out accuracy {metrics.get('accuracy', float('nan')):.4f}, macro-F1"
        f" {metrics.get('macro_f1', float('nan')):.4f} over {metrics.get('tokens', 0):.0f}"
        f" examples; checkpoint in {Path(f.workdir).absolute()}")


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "fine-tuning config file",
                                  lock_config=True)
  flags.DEFINE_string("init_from", None, "the pretrained run's workdir (or config.init_from)")
  flags.DEFINE_string("workdir", None, "checkpoints, logs, config.json, tokenizer")
  command_line.define_distributed_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  command_line.run(_main, "research.finetune")
