"""Tiny encoder-decoder on the built-in synthetic translation task: CPU, minutes.

  fusedlm train --config experiments/tiny_seq2seq.py --workdir runs/tiny_seq2seq
  fusedlm evaluate --workdir runs/tiny_seq2seq          # + BLEU, chrF
  fusedlm translate --workdir runs/tiny_seq2seq --text "mo tibu zeti pibi luza tedu salo"
  fusedlm train --config experiments/tiny_seq2seq.py:runlocal --workdir /tmp/smoke

The task (research.data.synthetic_translation) has one correct translation
per sentence, so held-out BLEU near 100 means the rules were learned.
"""

from fusedlm.research import run_config


def get_config(arg: str = ""):
  config = run_config.defaults("seq2seq")
  config.model.preset = "tiny_seq2seq"  # 2 + 2 layers, 128 wide, 4 heads
  config.model.max_len = 32  # = data.seq_len
  config.model.dtype = "float32"  # a CPU emulates bfloat16 matmuls: slower, not faster
  config.data.corpus = "synthetic"
  config.data.vocab_size = 512  # the task's words and suffixes, whole
  config.data.seq_len = 32  # the longest target is 20 tokens (+ end) with this vocabulary
  config.data.too_long = "skip"  # :runlocal's byte tokenizer makes some pairs longer
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.b2 = 0.98  # Vaswani et al.
  config.optimizer.weight_decay = 0.01
  config.train.steps = 1200
  config.train.batch_size = 64
  config.train.log_every = 50
  config.train.eval_every = 400
  config.train.eval_batches = 8
  config.checkpoint.every = 400
  config.decode.beam_size = 0  # greedy: the task has one answer
  return run_config.finish(config, arg)
