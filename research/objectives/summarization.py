"""Summarization: the seq2seq objective on (document, summary) pairs, scored with ROUGE.

The model, loss, data and decoding are seq2seq's (research.objectives.seq2seq:
an encoder-decoder, label-smoothed cross-entropy of the target tokens, pairs
from the same readers); what differs is what the run is scored with and a few
defaults. An experiment starts from `run_config.defaults("summarization")`:

  config.data.corpus   "stdlib_summaries": the built-in task (a docstring's
                       body -> its summary line, research.data.stdlib_summaries);
                       or the user's pairs file(s), read as seq2seq reads them
                       (source_field = the document, target_field = the summary)
  config.decode        beam search with a length penalty, and the length and
                       repetition constraints summarizers decode with
                       (min_new_tokens, max_new_tokens, no_repeat_ngram_size;
                       research.inference.seq2seq_decoding)

`fusedlm evaluate` reports the target tokens' loss, perplexity and accuracy,
then decodes the split and reports ROUGE-1, ROUGE-2 and ROUGE-L (Lin 2004)
as the `rouge-score` package computes them: F-measure, Porter stemming, its
tokenizer (lower-cased ASCII letters and digits), the best over a source's
references, averaged over the sources, times 100 (as Hugging Face's
summarization examples report them). `fusedlm translate --reference` on a
summarization run scores the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fusedlm.research.data import stdlib_summaries
from fusedlm.research.objectives import seq2seq

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def extend_defaults(config):
  """seq2seq's defaults with the built-in summaries, a longer source and
  summarizers' decoding."""
  config = seq2seq.extend_defaults(config)
  config.data.corpus = stdlib_summaries.NAME
  config.data.validation_fraction = 0.1
  config.data.seq_len = 96  # the built-in sources are at most 24 words
  config.decode.no_repeat_ngram_size = 3  # as BART's and PEGASUS's summarizers decode
  return config


def rouge_scores(hypotheses: list[str], references: list[list[str]]) -> dict:
  """Mean ROUGE-1 / 2 / L F-measures (0-100) of the hypotheses, each against
  the best of its references, with rouge-score's stemming tokenizer."""
  from rouge_score import rouge_scorer  # only scoring needs it
  if len(hypotheses) != len(references) or not hypotheses:
    raise ValueError(f"{len(hypotheses)} summaries for {len(references)} reference sets;"
                     " give one set of references (at least one) per summary.")
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  per_type = {name: [] for name in ROUGE_TYPES}
  for hypothesis, refs in zip(hypotheses, references):
    scores = scorer.score_multi(refs, hypothesis)  # the best reference, per type
    for name in ROUGE_TYPES:
      per_type[name].append(scores[name].fmeasure)
  metrics = {name: 100.0 * float(np.mean(values)) for name, values in per_type.items()}
  metrics.update(summaries=len(hypotheses), references=sum(len(r) for r in references),
                 rouge_signature="rouge-score F-measure, Porter stemmer, best reference,"
                                 " mean over summaries")
  return metrics


OBJECTIVE = dataclasses.replace(
    seq2seq.OBJECTIVE,
    name="summarization",
    report_keys=("loss", "perplexity", "accuracy", *ROUGE_TYPES),
    config_defaults=extend_defaults,
    extra_evaluation=seq2seq.decoding_evaluation(rouge_scores),
    text_scores=rouge_scores,
)
