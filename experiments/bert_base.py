"""BERT-base (110M parameters, MLM + NSP, sequence 512) for GPUs.

  fusedlm train --config experiments/bert_base.py --workdir /ckpt/bert_base \
      --config.data.corpus='/data/wiki/*.txt'
  fusedlm train --config experiments/bert_base.py:runlocal --workdir /tmp/smoke

bf16 compute, float32 parameters and optimizer state (the defaults).
"""

from fusedlm.research import run_config


def get_config(arg: str = ""):
  config = run_config.defaults()
  config.model.preset = "bert_base"  # 12 layers, 768 wide, 12 heads, post-LN, dropout 0.1
  config.data.tokenizer = "wordpiece"  # BERT-style, lower-cased
  config.data.vocab_size = 30522  # BERT-uncased's size (a small corpus yields fewer)
  config.data.seq_len = 512  # [CLS] A [SEP] B [SEP]
  config.objective = "mlm"
  config.nsp = True
  config.optimizer.learning_rate = 1e-4  # BERT's recipe from here on
  config.optimizer.schedule = "linear"
  config.optimizer.warmup_steps = 10_000
  config.optimizer.min_lr_ratio = 0.0
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-6
  config.optimizer.weight_decay = 0.01
  config.train.steps = 1_000_000  # BERT: 1M updates of 256 rows; raise accumulation_steps
  config.train.batch_size = 64
  config.train.eval_every = 5000
  config.train.eval_batches = 50
  config.checkpoint.every = 5000
  config.checkpoint.keep = 3
  return run_config.finish(config, arg)
