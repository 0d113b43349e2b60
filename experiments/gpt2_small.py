"""GPT-2 small (124M parameters, context 1024) for GPUs.

  fusedlm train --config experiments/gpt2_small.py --workdir /ckpt/gpt2_small \
      --config.data.corpus='/data/owt/*.txt'
  fusedlm train --config experiments/gpt2_small.py:runlocal --workdir /tmp/smoke

bf16 compute, float32 parameters and optimizer state (the defaults); softmax,
logits and the loss are float32 inside the model whatever the compute dtype.
"""

from fusedlm.research import run_config


def get_config(arg: str = ""):
  config = run_config.defaults()
  config.model.preset = "gpt2_small"  # 12 layers, 768 wide, 12 heads, tied LM head
  config.model.dropout = 0.0  # nanoGPT-style pretraining uses none
  config.model.logits_chunk = 4096  # the 50k-vocab logits a chunk at a time (see ModelConfig)
  config.data.vocab_size = 50257  # GPT-2's size (a small corpus yields fewer)
  config.data.seq_len = 1024
  config.optimizer.learning_rate = 6e-4  # GPT-3 paper's rate for 125M
  config.optimizer.warmup_steps = 2000
  config.train.steps = 100_000  # raise accumulation_steps to reach ~0.5M tokens/update
  config.train.batch_size = 64  # 64k tokens per micro-batch
  config.train.eval_every = 2000
  config.train.eval_batches = 50
  config.checkpoint.every = 2000
  config.checkpoint.keep = 3
  return run_config.finish(config, arg)
