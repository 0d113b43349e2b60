"""Tiny BERT (~1.9M parameters, MLM + NSP) on the built-in corpus: trains on a laptop CPU.

  python -m research.train --config experiments/tiny_bert.py --workdir runs/tiny_bert
  python -m research.train --config experiments/tiny_bert.py:runlocal --workdir /tmp/smoke
"""

from research import run_config


def get_config(arg: str = ""):
  config = run_config.defaults()
  config.model.preset = "tiny_bert"  # 4 layers, 128 wide, 4 heads, post-LN
  config.model.max_len = 128  # = data.seq_len
  config.model.dtype = "float32"  # a CPU emulates bfloat16 matmuls: slower, not faster
  config.data.tokenizer = "wordpiece"  # BERT-style
  config.data.vocab_size = 2048  # small: the tied output layer dominates a tiny model's FLOPs
  config.objective = "mlm"
  config.nsp = True
  config.optimizer.learning_rate = 2e-3  # tiny models take a high rate
  config.optimizer.warmup_steps = 30
  config.optimizer.b2 = 0.98  # RoBERTa-style
  config.train.steps = 300
  config.train.batch_size = 16
  config.train.log_every = 20
  config.train.eval_every = 100
  config.train.eval_batches = 0  # the whole validation split: its first 16 batches are
                                 # its first documents in order, not a sample of it
  config.checkpoint.every = 100
  return run_config.finish(config, arg, smoke=_smoke)


def _smoke(config):
  config.optimizer.learning_rate = 5e-3  # the 64-wide smoke model takes a higher rate
