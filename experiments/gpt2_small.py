"""GPT-2 small (124M parameters, context 1024) for GPUs.

Launch (every local GPU, pmap data parallelism):
  python -m research.train --config experiments/gpt2_small.py --workdir /ckpt/gpt2_small
  # point data.corpus at a real corpus: --config.data.corpus=/data/owt/*.txt

bf16 compute, float32 parameters and optimizer state; softmax, logits and the
loss are float32 inside the model whatever the compute dtype.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.preset = "gpt2_small"  # 12 layers, 768 wide, 12 heads, tied LM head
  config.model.max_len = 1024  # context length (position-table rows)
  config.model.dropout = 0.0  # nanoGPT-style pretraining uses none
  config.model.dtype = "bfloat16"  # compute dtype
  config.model.param_dtype = "float32"  # parameters and optimizer state
  config.model.remat = False  # rematerialise blocks if memory is short
  config.model.attention = "auto"  # the fused Pallas kernel on GPU

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "builtin"  # replace with a real corpus path / glob / .jsonl
  config.data.tokenizer = "bpe"  # GPT-2-style byte-level BPE
  config.data.vocab_size = 50257  # GPT-2's size (a small corpus yields fewer)
  config.data.seq_len = 1024  # tokens per row
  config.data.cache_dir = ""  # "" = ~/.cache/fusedlm

  config.objective = "causal"  # next-token prediction
  config.nsp = False  # unused for causal

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 6e-4  # GPT-3 paper's rate for 125M
  config.optimizer.schedule = "cosine"  # decay after warm-up
  config.optimizer.warmup_steps = 2000  # linear warm-up
  config.optimizer.min_lr_ratio = 0.1  # final rate / peak
  config.optimizer.b1 = 0.9  # Adam first moment
  config.optimizer.b2 = 0.95  # Adam second moment
  config.optimizer.eps = 1e-8  # Adam epsilon
  config.optimizer.weight_decay = 0.1  # decoupled, weight matrices only
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping
  config.optimizer.accumulation_steps = 1  # raise to reach ~0.5M tokens/update

  config.train = ml_collections.ConfigDict()
  config.train.steps = 100_000  # optimizer updates (x accumulation_steps micro-batches)
  config.train.batch_size = 64  # global rows per micro-batch (64 k tokens)
  config.train.seed = 0  # init, dropout and data order
  config.train.log_every = 50  # steps per train log row
  config.train.eval_every = 2000  # steps between validation passes
  config.train.eval_batches = 50  # validation batches per pass (0 = all)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 2000  # steps between checkpoints (and at the end)
  config.checkpoint.keep = 3  # newest checkpoints kept
  config.checkpoint["async"] = True  # save in the background
  return config
