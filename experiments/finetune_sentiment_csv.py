"""Fine-tunes a pretrained model on your own sentiment data (CSV, TSV or JSON Lines).

The file needs a text column and a label column (any label strings:
"positive"/"negative", 0/1, 1-5 stars); name yours with the data fields.
Validation is your held-out file, or a hashed 10% of the training file:

  fusedlm finetune --config experiments/finetune_sentiment_csv.py \
      --init_from runs/tiny_bert --workdir runs/sentiment \
      --config.data.task=reviews_train.csv --config.data.validation=reviews_test.csv
  fusedlm evaluate --workdir runs/sentiment --data reviews_other.csv

The label names of the training file (sorted; numerically when all are
integers) number the classes, and are saved with the run so that evaluating
another file maps its labels the same way.
"""

from fusedlm.research import run_config


def get_config(arg: str = ""):
  config = run_config.finetune_defaults()
  config.model.dropout = 0.1  # on the embeddings, sublayers and the new head
  # config.data.task: required, your training file (--config.data.task=...)
  config.train.steps = 500  # scale with your data
  return run_config.finish(config, arg)
