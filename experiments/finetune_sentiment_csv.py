"""Fine-tunes a pretrained model on your own sentiment data (CSV, TSV or JSON Lines).

The file needs a text column and a label column (any label strings:
"positive"/"negative", 0/1, 1-5 stars); name yours with the data fields.
Validation is your held-out file, or a hashed 10% of the training file:

  python -m research.finetune --config experiments/finetune_sentiment_csv.py \
      --init-from runs/tiny_bert --workdir runs/sentiment \
      --config.data.task=reviews_train.csv --config.data.validation=reviews_test.csv
  python -m research.evaluate --workdir runs/sentiment --data reviews_other.csv

The label names of the training file (sorted; numerically when all are
integers) number the classes, and are saved with the run so that evaluating
another file maps its labels the same way.
"""

import importlib.util
from pathlib import Path

import ml_collections


def _base_config() -> ml_collections.ConfigDict:
  """finetune_topics.py's config (loaded by path: experiments/ is not a package)."""
  path = Path(__file__).with_name("finetune_topics.py")
  spec = importlib.util.spec_from_file_location("finetune_topics", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  config = _base_config()
  config.data.task = ""  # required: your training file (--config.data.task=...)
  config.data.validation = ""  # your held-out file; "" = hold out validation_fraction
  config.data.validation_fraction = 0.1  # used when no validation file is given
  config.data.text_field = "text"  # the text column
  config.data.text_pair_field = ""  # a second text column, for pair tasks
  config.data.label_field = "label"  # the label column
  config.data.seq_len = 128  # reviews longer than this are cut
  config.train.steps = 500  # optimizer updates; scale with your data
  config.train.eval_every = 100
  config.checkpoint.every = 100
  return config
