"""Fine-tunes a pretrained tiny model on the built-in labelled task (stdlib topics).

The task (research.data.stdlib_topics) needs no download: standard-library
docstrings labelled by the area they document (concurrency, email, testing,
web, xml). Pretrain first, then fine-tune either model:

  fusedlm train --config experiments/tiny_bert.py --workdir runs/tiny_bert
  fusedlm finetune --config experiments/finetune_topics.py \
      --init_from runs/tiny_bert --workdir runs/topics --config.data.seq_len=64
  fusedlm evaluate --workdir runs/topics

(the tiny BERT's positions stop at 64; --init_from runs/tiny_gpt fine-tunes the
decoder instead, at the default 128 tokens.) The model is the
pretrained one; only the fields under config.model may change how it runs.
"""

from fusedlm.research import run_config


def get_config(arg: str = ""):
  config = run_config.finetune_defaults()
  config.model.dropout = 0.1  # on the embeddings, sublayers and the new head
  config.data.task = "stdlib_topics"
  config.data.validation_fraction = 0.2
  # 300 steps of 32: ~7 epochs of the 1,390 training examples (the defaults).
  return run_config.finish(config, arg)
