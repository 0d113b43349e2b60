"""Tiny GPT on the synthetic Markov corpus: its validation loss should approach
the source's entropy rate (research.data.synthetic; nats/character with the
"byte" tokenizer, one token per character). Used by tests/research/test_train_entropy.py.

Launch:
  python -m research.train --config experiments/tiny_gpt_synthetic.py --workdir /tmp/tgs
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.preset = "tiny_gpt"  # fields below override it
  config.model.num_layers = 2  # a first-order chain needs little depth
  config.model.hidden_size = 64  # residual width
  config.model.num_heads = 2  # attention heads (head_dim 32)
  config.model.mlp_dim = 256  # MLP hidden width
  config.model.max_len = 64  # position-table rows; >= data.seq_len
  config.model.dropout = 0.0  # no regularisation needed
  config.model.dtype = "float32"  # compute dtype (CPU: float32 is faster)
  config.model.param_dtype = "float32"  # parameters and optimizer state
  config.model.attention = "xla"  # plain XLA attention: fastest on CPU

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "synthetic"  # research.data.synthetic, default SyntheticSpec
  config.data.tokenizer = "byte"  # one token per character: loss in nats/char
  config.data.vocab_size = 261  # the byte tokenizer's fixed size
  config.data.seq_len = 64  # tokens per row
  config.data.cache_dir = ""  # "" = ~/.cache/fusedlm

  config.objective = "causal"  # next-token prediction
  config.nsp = False  # unused

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-2  # tiny model, easy task
  config.optimizer.schedule = "cosine"  # decay after warm-up
  config.optimizer.warmup_steps = 20  # linear warm-up
  config.optimizer.min_lr_ratio = 0.05  # final rate / peak
  config.optimizer.b1 = 0.9  # Adam first moment
  config.optimizer.b2 = 0.95  # Adam second moment
  config.optimizer.eps = 1e-8  # Adam epsilon
  config.optimizer.weight_decay = 0.0  # nothing to regularise
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping
  config.optimizer.accumulation_steps = 1  # micro-batches per update

  config.train = ml_collections.ConfigDict()
  config.train.steps = 500  # optimizer updates (x accumulation_steps micro-batches)
  config.train.batch_size = 32  # global rows
  config.train.seed = 0  # init and data order
  config.train.log_every = 20  # steps per train log row
  config.train.eval_every = 500  # one validation pass, at the end
  config.train.eval_batches = 16  # validation batches (0 = all)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 500  # one checkpoint, at the end
  config.checkpoint.keep = 1  # newest checkpoints kept
  config.checkpoint["async"] = True  # save in the background
  return config
