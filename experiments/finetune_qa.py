"""Fine-tunes a pretrained encoder for extractive QA on the built-in task (stdlib_qa).

The task (research.data.stdlib_qa) needs no download: a card for each
documented standard-library function, class and method (its summary, kind,
module, details and class, in a shuffled order) and four questions about it,
one of them unanswerable for a function or class (SQuAD 2.0 style). Pretrain
the tiny BERT first, then:

  fusedlm train --config experiments/tiny_bert.py --workdir runs/tiny_bert
  fusedlm finetune --config experiments/finetune_qa.py \
      --init_from runs/tiny_bert --workdir runs/stdlib_qa
  fusedlm evaluate --workdir runs/stdlib_qa        # exact match, F1, predictions.json
  fusedlm finetune --config experiments/finetune_qa.py:runlocal \
      --init_from runs/tiny_bert --workdir /tmp/smoke

SQuAD itself (a BERT from `fusedlm import-hf`; the field's window settings):

  fusedlm finetune --config experiments/finetune_qa.py --init_from runs/bert_hf \
      --workdir runs/squad --config.data.task=train-v1.1.json \
      --config.data.validation=dev-v1.1.json --config.data.seq_len=384 \
      --config.data.doc_stride=128 --config.data.max_query_len=64 \
      --config.optimizer.learning_rate=3e-5 --config.train.steps=5500

The tiny BERT's positions stop at 64, so its windows are 64 tokens: a
question of at most 24 and 37 or more context tokens, 16 apart.
"""

from fusedlm.research import run_config


def get_config(arg: str = ""):
  config = run_config.finetune_defaults("qa")
  config.data.task = "stdlib_qa"
  config.data.seq_len = 64  # = the tiny BERT's max_len
  config.data.max_query_len = 24  # "Which module defines <name>?"
  config.data.doc_stride = 16
  config.optimizer.learning_rate = 2e-3
  config.train.steps = 800
  config.train.batch_size = 32
  config.train.eval_every = 400
  config.checkpoint.every = 400
  config.decode.max_answer_len = 30  # a summary line
  return run_config.finish(config, arg)
