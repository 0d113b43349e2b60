"""The evaluation pass shared by training and by checkpoint evaluation.

  p_eval = train_state.pmapped_eval_step(model, objective, nsp, devices)
  summary = evaluate_batches(p_eval, replicate(params, devices), batches, len(devices))

Batches come from a batch maker's `eval_batches()`: every example once, the
last batch padded with rows of weight 0, so the sums (and the summary) do not
depend on how many devices share the work.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np

from research import objectives
from research.parallel import shard


def evaluate_batches(p_eval, replicated_params, batches: Iterable[dict],
                     num_devices: int) -> dict:
  """objectives.summarize of the metric sums over `batches` ([global_batch, ...] each).

  The summary also holds "batches" (how many were evaluated) and, for
  classification, "confusion" ([true][predicted] counts, as nested lists).
  """
  totals: dict = {}
  count = 0
  for batch in batches:
    sums = jax.device_get(p_eval(replicated_params, shard(batch, num_devices)))
    for key, value in sums.items():
      value = np.asarray(value)[0].astype(np.float64)  # psum'd: every device holds it
      totals[key] = totals[key] + value if key in totals else value
    count += 1
  if not count:
    raise ValueError("no evaluation batches: the evaluation data is empty.")
  summary = objectives.summarize(totals)
  summary["batches"] = count
  if "confusion" in totals:
    summary["confusion"] = totals["confusion"].astype(int).tolist()
  return summary
