"""BERT-base (110M parameters, MLM + NSP, sequence 512) for GPUs.

Launch (every local GPU, pmap data parallelism):
  python -m research.train --config experiments/bert_base.py --workdir /ckpt/bert_base
  # point data.corpus at a real corpus: --config.data.corpus=/data/wiki/*.txt

bf16 compute, float32 parameters and optimizer state.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.preset = "bert_base"  # 12 layers, 768 wide, 12 heads, post-LN
  config.model.max_len = 512  # position-table rows
  config.model.dropout = 0.1  # BERT's hidden dropout
  config.model.dtype = "bfloat16"  # compute dtype
  config.model.param_dtype = "float32"  # parameters and optimizer state
  config.model.remat = False  # rematerialise blocks if memory is short
  config.model.attention = "auto"  # the fused Pallas kernel on GPU

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "builtin"  # replace with a real corpus path / glob / .jsonl
  config.data.tokenizer = "wordpiece"  # BERT-style, lower-cased
  config.data.vocab_size = 30522  # BERT-uncased's size (a small corpus yields fewer)
  config.data.seq_len = 512  # tokens per row ([CLS] A [SEP] B [SEP])
  config.data.mask_prob = 0.15  # fraction of tokens selected for MLM (80/10/10)
  config.data.whole_word_masking = False  # mask whole words, not word pieces
  config.data.cache_dir = ""  # "" = ~/.cache/fusedlm

  config.objective = "mlm"  # masked-LM
  config.nsp = True  # plus next-sentence prediction

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4  # BERT's peak rate
  config.optimizer.schedule = "linear"  # BERT's linear decay
  config.optimizer.warmup_steps = 10_000  # linear warm-up
  config.optimizer.min_lr_ratio = 0.0  # decay to zero
  config.optimizer.b1 = 0.9  # Adam first moment
  config.optimizer.b2 = 0.999  # Adam second moment (BERT)
  config.optimizer.eps = 1e-6  # Adam epsilon (BERT)
  config.optimizer.weight_decay = 0.01  # decoupled, weight matrices only
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping
  config.optimizer.accumulation_steps = 1  # raise to reach BERT's 256 x 512

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1_000_000  # optimizer updates (BERT: 1M updates of 256 rows)
  config.train.batch_size = 64  # global rows per micro-batch
  config.train.seed = 0  # init, dropout, masking and data order
  config.train.log_every = 50  # steps per train log row
  config.train.eval_every = 5000  # steps between validation passes
  config.train.eval_batches = 50  # validation batches per pass (0 = all)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 5000  # steps between checkpoints (and at the end)
  config.checkpoint.keep = 3  # newest checkpoints kept
  config.checkpoint["async"] = True  # save in the background
  return config
