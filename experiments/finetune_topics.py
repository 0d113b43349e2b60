"""Fine-tunes a pretrained tiny model on the built-in labelled task (stdlib topics).

The task (research.data.stdlib_topics) needs no download: standard-library
docstrings labelled by the area they document (concurrency, email, testing,
web, xml). Pretrain first, then fine-tune either model:

  python -m research.train --config experiments/tiny_bert.py --workdir runs/tiny_bert
  python -m research.finetune --config experiments/finetune_topics.py \
      --init-from runs/tiny_bert --workdir runs/topics
  python -m research.evaluate --workdir runs/topics

(--init-from runs/tiny_gpt fine-tunes the decoder instead.) The model is the
pretrained one; only the fields under config.model may change how it runs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_from = ""  # pretrained workdir; --init-from overrides it
  config.init_step = 0  # its checkpoint step; 0 = the newest

  config.model = ml_collections.ConfigDict()
  config.model.dropout = 0.1  # on the embeddings, sublayers and the new head

  config.data = ml_collections.ConfigDict()
  config.data.task = "stdlib_topics"  # the built-in task, or a .csv / .tsv / .jsonl file
  config.data.validation = ""  # held-out file; "" = hold out validation_fraction of the task
  config.data.validation_fraction = 0.2  # by a hash of each text
  config.data.text_field = "text"  # column / field names of a file task
  config.data.text_pair_field = ""  # second text of pair tasks; "" = single texts
  config.data.label_field = "label"
  config.data.seq_len = 128  # tokens per example ([CLS] text [SEP]); <= the model's max_len
  config.data.cache_dir = ""  # unused by classification data (kept for symmetry)

  config.objective = "classification"

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3  # peak; tiny models take a high rate
  config.optimizer.schedule = "linear"  # BERT's fine-tuning schedule
  config.optimizer.warmup_steps = 30  # linear warm-up (10% of the steps)
  config.optimizer.min_lr_ratio = 0.0  # decay to zero
  config.optimizer.b1 = 0.9  # Adam first moment
  config.optimizer.b2 = 0.999  # Adam second moment
  config.optimizer.eps = 1e-8  # Adam epsilon
  config.optimizer.weight_decay = 0.01  # decoupled, weight matrices only
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
  config.optimizer.accumulation_steps = 1  # micro-batches per update

  config.train = ml_collections.ConfigDict()
  config.train.steps = 300  # optimizer updates (~7 epochs of the 1,390 train examples)
  config.train.batch_size = 32  # global batch (examples)
  config.train.seed = 0  # head init, dropout and data order
  config.train.log_every = 20  # steps per train log row
  config.train.eval_every = 100  # steps between held-out evaluations
  config.train.eval_batches = 0  # 0 = the whole held-out split

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 100  # steps between checkpoints (and at the end)
  config.checkpoint.keep = 1  # newest checkpoints kept
  config.checkpoint["async"] = True  # save in the background
  return config
