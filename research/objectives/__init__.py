"""What a run optimises: one `Objective` record per objective, in one registry.

  objective = objectives.get(config.objective)
  data = objective.train_data(config, tokenizer)           # run_data.RunData
  model_cfg = objective.model_config(config, vocab_size)   # ModelConfig
  outputs = objective.outputs(model, {"params": params}, batch)
  loss, sums = objective.loss(outputs, batch, model_cfg)

Everything that differs between objectives lives in its record: the batches it
trains and evaluates on, the model it needs, how the model is run on a batch,
the loss and metric sums, and what the commands report. The trainer, the
train and eval steps, the config schema and `fusedlm evaluate` only look a
record up. Adding an objective is one module here that defines its record and
one line in REGISTRY.

  causal          next-token prediction with a decoder (causal.py)
  mlm             masked-LM (+ optional next-sentence prediction) with an
                  encoder (mlm.py)
  classification  a pretrained encoder or decoder fine-tuned with a
                  sequence-classification head (classification.py)
  qa              extractive question answering: a pretrained encoder fine-tuned
                  with a span head on SQuAD-format data; exact match and F1
                  (qa.py, squad_scores.py)
  seq2seq         (source, target) pairs with an encoder-decoder; BLEU and chrF
                  by decoding (seq2seq.py)
  summarization   seq2seq's objective on (document, summary) pairs; ROUGE-1/2/L
                  by decoding (summarization.py)

Losses return (loss_mean, sums): metric *sums* with their denominators (see
metrics.py), which add across steps and devices; the host divides once.
"""

from __future__ import annotations

from fusedlm.research.objectives import causal, classification, mlm, qa, seq2seq, summarization
from fusedlm.research.objectives.causal import causal_lm_loss
from fusedlm.research.objectives.classification import classification_loss
from fusedlm.research.objectives.metrics import (
    confusion_matrix,
    f1_scores,
    summarize,
    weighted_cross_entropy,
)
from fusedlm.research.objectives.mlm import mlm_loss
from fusedlm.research.objectives.objective import Objective

REGISTRY: dict[str, Objective] = {
    o.name: o for o in (causal.OBJECTIVE, mlm.OBJECTIVE, classification.OBJECTIVE,
                        qa.OBJECTIVE, seq2seq.OBJECTIVE, summarization.OBJECTIVE)
}


def get(name: str) -> Objective:
  """The registered objective `name`; ValueError listing the known ones."""
  if not isinstance(name, str) or name not in REGISTRY:
    raise ValueError(f"unknown objective {name!r}; choose one of"
                     f" {', '.join(REGISTRY)}.")
  return REGISTRY[name]


__all__ = [
    "Objective", "REGISTRY", "get", "causal_lm_loss", "mlm_loss", "classification_loss",
    "confusion_matrix", "f1_scores", "summarize", "weighted_cross_entropy",
]
