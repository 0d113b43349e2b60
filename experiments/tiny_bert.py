"""Tiny BERT (~1.9M parameters, MLM + NSP) on the built-in corpus: trains on a laptop CPU.

Launch:
  python -m research.train --config experiments/tiny_bert.py --workdir /tmp/tiny_bert
  # smoke run:  ... --config.train.steps=20 --config.train.eval_batches=2

float32 compute: on CPU bfloat16 matmuls are emulated (slower, not faster), so
the tiny configs trade the GPU default (bf16 compute, f32 params) for speed.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.preset = "tiny_bert"  # research.model_config.presets; fields below override it
  config.model.num_layers = 4  # Transformer blocks
  config.model.hidden_size = 128  # residual width
  config.model.num_heads = 4  # attention heads (head_dim 32)
  config.model.mlp_dim = 512  # MLP hidden width
  config.model.max_len = 128  # position-table rows; >= data.seq_len
  config.model.dropout = 0.0  # too small a model / run to need it
  config.model.dtype = "float32"  # compute dtype (see docstring); GPU: "bfloat16"
  config.model.param_dtype = "float32"  # parameters and optimizer state
  config.model.attention = "auto"  # pallas on GPU, xla elsewhere

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "builtin"  # "builtin" | "synthetic" | a path / glob / .jsonl
  config.data.tokenizer = "wordpiece"  # BERT-style; "bpe" | "wordpiece" | "byte"
  config.data.vocab_size = 2048  # asked size; the model takes the trained size (small: the tied output layer dominates a tiny model's FLOPs)
  config.data.seq_len = 128  # tokens per training row ([CLS] A [SEP] B [SEP])
  config.data.mask_prob = 0.15  # fraction of tokens selected for MLM (80/10/10)
  config.data.whole_word_masking = False  # mask whole words, not word pieces
  config.data.cache_dir = ""  # tokenizer + tokenized-split cache; "" = ~/.cache/fusedlm

  config.objective = "mlm"  # masked-LM (BERT)
  config.nsp = True  # plus next-sentence prediction

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-3  # peak; tiny models take a high rate
  config.optimizer.schedule = "cosine"  # decay after warm-up
  config.optimizer.warmup_steps = 30  # linear warm-up
  config.optimizer.min_lr_ratio = 0.1  # final rate / peak
  config.optimizer.b1 = 0.9  # Adam first moment
  config.optimizer.b2 = 0.98  # Adam second moment (RoBERTa-style)
  config.optimizer.eps = 1e-8  # Adam epsilon
  config.optimizer.weight_decay = 0.1  # decoupled, weight matrices only
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
  config.optimizer.accumulation_steps = 1  # micro-batches per update

  config.train = ml_collections.ConfigDict()
  config.train.steps = 300  # optimizer updates (x accumulation_steps micro-batches)
  config.train.batch_size = 16  # global batch (rows), split over local devices
  config.train.seed = 0  # init, dropout and data order
  config.train.log_every = 20  # steps per train log row
  config.train.eval_every = 100  # steps between validation passes
  config.train.eval_batches = 16  # validation batches per pass (0 = all)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 100  # steps between checkpoints (and at the end)
  config.checkpoint.keep = 2  # newest checkpoints kept
  config.checkpoint["async"] = True  # save in the background
  return config
