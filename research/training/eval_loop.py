"""The evaluation pass: a checkpoint's metrics over a split's batches.

`evaluate_run` evaluates a saved run (`fusedlm evaluate`); `evaluate_batches`
is the pass training runs too: batches from a batch maker's `eval_batches()`
hold every example once, the last one padded with rows of weight 0, so the
sums (and the summary) do not depend on how many devices share the work.

What each objective reports (the model, tokenizer and data settings come from
the workdir, research.runs.checkpoint; only the parameters are restored, on
as many devices as this machine has, whatever the run trained on):

  causal          loss (nats per token), perplexity = exp(loss), accuracy
                  (next-token argmax)
  mlm             loss, perplexity and accuracy over the masked tokens (the
                  masks are a fixed function of the run's seed, so two
                  evaluations agree exactly); nsp_loss and nsp_accuracy with NSP
  classification  loss, accuracy, macro_f1 and the confusion matrix
                  ([true][predicted], in label_names order)
  qa              loss and accuracy (both span ends right) per window, then
                  SQuAD exact match and F1 of the answered questions
  seq2seq         loss, perplexity and accuracy of the target tokens, then
                  BLEU and chrF of the decoded split (sacrebleu)
  summarization   as seq2seq, with ROUGE-1/2/L (rouge-score) for BLEU

An objective's `extra_evaluation` (what is not a sum over batches, such as
decoding) runs after the metric pass; its metrics join the summary and its
outputs are returned beside them.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np

from fusedlm.research import models, objectives
from fusedlm.research.models import resolved_attention
from fusedlm.research.runs import saved_run
from fusedlm.research.runs.parallel import replicate, shard, unreplicate
from fusedlm.research.training import steps


def evaluate_run(workdir, *, step: int | None = None, data: str | None = None,
                 num_devices: int | None = None, batch_size: int | None = None,
                 max_batches: int | None = None) -> dict:
  """Evaluates the checkpoint at `step` (newest: None) of the run in `workdir`.

  Args:
    data: None for the run's validation split; otherwise what
      the objective's eval_data accepts (a corpus name or text path for a
      language model, a labelled CSV / TSV / JSON Lines file for a classifier).
    num_devices: local devices to spread the batches over (default all).
    batch_size: global evaluation batch (default the run's train.batch_size);
      a multiple of the device count.
    max_batches: evaluate only the first this many batches (default all).

  Returns:
    {"workdir", "step", "objective", "data", "devices", "batch_size",
    "attention" (lines: what each attention layer resolved to, and why),
    "metrics": {...}}; classification
    adds "label_names"; an objective with an extra evaluation adds "outputs"
    ({name: lines}, e.g. seq2seq's "hypotheses").

  Raises:
    FileNotFoundError / ValueError: a missing run, step or data file, a
      checkpoint that does not fit the run's model, or a bad batch size.
  """
  run = saved_run.open_run(workdir)
  step = run.resolve_step(step)
  devices = jax.local_devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices}, but this machine has"
                       f" {len(devices)} local devices.")
    devices = devices[:num_devices]
  batch_size = run.config.train.batch_size if batch_size is None else batch_size
  if batch_size < 1 or batch_size % len(devices):
    raise ValueError(f"the evaluation batch size ({batch_size}) must be a positive"
                     f" multiple of the {len(devices)} devices; pass --batch_size.")
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"max_batches must be >= 1, got {max_batches}.")
  # Data first: a bad --data fails before the checkpoint is read.
  objective = objectives.get(run.objective)
  batches, description = objective.eval_data(
      run.config, run.tokenizer, batch_size, data, run.label_names)
  _, params = run.restore_params(step)
  model = models.build_model(run.model_cfg)
  p_eval = steps.pmapped_eval_step(model, objective, devices)
  metrics = evaluate_batches(p_eval, replicate(params, devices),
                             batches.eval_batches(max_batches), len(devices))
  attention = resolved_attention.for_batch(
      run.model_cfg, objective, next(iter(batches.eval_batches(1))))
  result = {"workdir": str(run.workdir), "step": step, "objective": run.objective,
            "data": description, "devices": len(devices), "batch_size": batch_size,
            "attention": resolved_attention.describe(attention, run.model_cfg),
            "metrics": metrics}
  if run.label_names is not None:
    result["label_names"] = list(run.label_names)
  if objective.extra_evaluation is not None:
    extra = objective.extra_evaluation(run, params, batches, max_batches)
    metrics.update(extra["metrics"])
    result["outputs"] = extra["outputs"]
  return result


def evaluate_batches(p_eval, replicated_params, batches: Iterable[dict],
                     num_devices: int) -> dict:
  """objectives.summarize of the metric sums over `batches` ([global_batch, ...] each).

  The summary also holds "batches" (how many were evaluated) and, for
  classification, "confusion" ([true][predicted] counts, as nested lists).
  """
  totals: dict = {}
  count = 0
  for batch in batches:
    # psum'd: every device holds the sums; one host copy of them.
    sums = unreplicate(p_eval(replicated_params, shard(batch, num_devices)))
    for key, value in sums.items():
      value = value.astype(np.float64)
      totals[key] = totals[key] + value if key in totals else value
    count += 1
  if not count:
    raise ValueError("no evaluation batches: the evaluation data is empty.")
  summary = objectives.summarize(totals)
  summary["batches"] = count
  if "confusion" in totals:
    summary["confusion"] = totals["confusion"].astype(int).tolist()
  return summary


def format_summary(summary: dict, objective_name: str) -> str:
  """The summary's reported metrics, rounded and labelled, on one line:
  "loss 4.5912, perplexity 98.31, accuracy 19.10% (over 12,288 tokens)"."""
  objective = objectives.get(objective_name)
  parts = []
  for key in objective.report_keys:
    if key not in summary:
      continue
    value = summary[key]
    if "accuracy" in key:
      parts.append(f"{key.replace('_', ' ')} {value:.2%}")
    elif key in ("bleu", "chrf"):
      parts.append(f"{key.upper()} {value:.2f}")
    elif key == "perplexity":
      parts.append(f"perplexity {value:.2f}")
    else:
      parts.append(f"{key.replace('_', ' ')} {value:.4f}")
  count = summary.get("tokens")
  return ", ".join(parts) + (f" (over {count:,.0f} {objective.count_unit})"
                             if count is not None else "")
