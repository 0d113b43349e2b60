"""Tiny GPT on the synthetic Markov corpus: its validation loss should approach
the source's entropy rate (research.data.synthetic; nats/character with the
"byte" tokenizer, one token per character). Used by tests/research/test_train_entropy.py.

  fusedlm train --config experiments/tiny_gpt_synthetic.py --workdir /tmp/tgs
  fusedlm train --config experiments/tiny_gpt_synthetic.py:runlocal --workdir /tmp/smoke
"""

from fusedlm.research import run_config


def get_config(arg: str = ""):
  config = run_config.defaults()
  config.model.preset = "tiny_gpt"
  config.model.num_layers = 2  # a first-order chain needs little depth
  config.model.hidden_size = 64
  config.model.num_heads = 2  # head_dim 32
  config.model.mlp_dim = 256
  config.model.max_len = 64  # = data.seq_len
  config.model.dtype = "float32"  # a CPU emulates bfloat16 matmuls: slower, not faster
  config.model.attention = "xla"  # plain XLA attention: fastest on CPU
  config.data.corpus = "synthetic"  # research.data.synthetic, default SyntheticSpec
  config.data.tokenizer = "byte"  # one token per character: loss in nats/char
  config.data.vocab_size = 261  # the byte tokenizer's fixed size
  config.data.seq_len = 64
  config.optimizer.learning_rate = 1e-2  # tiny model, easy task
  config.optimizer.warmup_steps = 20
  config.optimizer.min_lr_ratio = 0.05
  config.optimizer.weight_decay = 0.0  # nothing to regularise
  config.train.steps = 500
  config.train.log_every = 20
  config.train.eval_every = 500  # one validation pass, at the end
  config.checkpoint.every = 500  # one checkpoint, at the end
  config.checkpoint.keep = 1
  return run_config.finish(config, arg)
