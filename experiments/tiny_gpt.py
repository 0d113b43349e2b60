"""Tiny GPT (~1.9M parameters) on the built-in corpus: trains on a laptop CPU.

  fusedlm train --config experiments/tiny_gpt.py --workdir runs/tiny_gpt
  fusedlm train --config experiments/tiny_gpt.py:runlocal --workdir /tmp/smoke
"""

from fusedlm.research import run_config


def get_config(arg: str = ""):
  config = run_config.defaults()
  config.model.preset = "tiny_gpt"  # 4 layers, 128 wide, 4 heads
  config.model.max_len = 128  # = data.seq_len
  config.model.dtype = "float32"  # a CPU emulates bfloat16 matmuls: slower, not faster
  config.data.vocab_size = 2048  # small: the tied output layer dominates a tiny model's FLOPs
  config.optimizer.learning_rate = 3e-3  # tiny models take a high rate
  config.optimizer.warmup_steps = 30
  config.train.steps = 300
  config.train.batch_size = 16
  config.train.log_every = 20
  config.train.eval_every = 100
  config.train.eval_batches = 0  # the whole validation split: its first 16 batches are
                                 # its first documents in order, not a sample of it
  config.checkpoint.every = 100
  return run_config.finish(config, arg)
