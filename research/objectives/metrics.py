"""What every objective's loss and metrics are made of.

Every loss returns (loss_mean, metrics). loss_mean is what the optimizer
differentiates; metrics are float32 *sums* with their denominators, so they
add across steps and devices (psum), and the host divides once in `summarize`:

  loss_sum, correct, count              main objective (count = tokens for the
                                        LM objectives, examples otherwise)
  nsp_loss_sum, nsp_correct, nsp_count  next-sentence prediction (mlm with nsp)
  confusion                             classification evaluation only:
                                        [true, predicted] weighted counts, from
                                        which `summarize` takes macro-F1

Cross-entropies are taken on float32 logits. Labels at zero-weight positions
are never read (they may be -100, Hugging Face's ignore index, or garbage).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax


def weighted_cross_entropy(
    logits,  # [..., classes] float
    labels,  # [...] int
    weights,  # [...] float; 0 = ignore
) -> dict[str, jax.Array]:  # loss_sum, correct, count (float32 scalars)
  """Sums of cross-entropy and of correct argmax predictions, weighted."""
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  used = weights > 0
  # An ignored label may be out of range; read class 0 there and drop it.
  safe_labels = jnp.where(used, labels, 0)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  hit = (jnp.argmax(logits, axis=-1) == safe_labels).astype(jnp.float32)
  # where, not a product: NaN * 0 is NaN if an ignored position's logits are bad.
  return {
      "loss_sum": jnp.sum(jnp.where(used, loss * weights, 0.0)),
      "correct": jnp.sum(jnp.where(used, hit * weights, 0.0)),
      "count": jnp.sum(weights),
  }


def row_weights(batch: dict, rows: int):
  """batch["weights"] [B] (0 = an evaluation padding row), else all ones."""
  weights = batch.get("weights")
  if weights is None:
    return jnp.ones((rows,), jnp.float32)
  return weights.astype(jnp.float32)


def safe_mean(total, count):
  """total / count, 0 when nothing counted (an all-padding batch)."""
  return total / jnp.maximum(count, 1e-8)


def confusion_matrix(
    logits,  # [batch, num_labels] float
    labels,  # [batch] int
    weights,  # [batch] float; 0 = padding example
) -> jax.Array:  # [num_labels, num_labels] float32, rows = true, columns = predicted
  """Weighted counts of (true label, argmax prediction) pairs; they psum across devices."""
  num_labels = logits.shape[-1]
  predicted = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_labels, dtype=jnp.float32)
  truth = jax.nn.one_hot(labels, num_labels, dtype=jnp.float32)  # out of range: zeros
  return jnp.einsum("bt,bp->tp", truth * weights.astype(jnp.float32)[:, None], predicted)


def f1_scores(confusion) -> np.ndarray:  # [num_labels] float64
  """Per-class F1 = 2 TP / (2 TP + FP + FN); 0 for a class never true nor predicted.

  Taking 0 there (as scikit-learn's zero_division=0 does) keeps macro-F1 from
  rewarding a model for classes the evaluation data lacks.
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  denominator = confusion.sum(0) + confusion.sum(1)  # = 2 TP + FP + FN
  return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def summarize(sums: dict) -> dict[str, float]:
  """Host-side means from summed metrics: loss, accuracy, perplexity, nsp_*.

  perplexity = exp(loss) of the main objective (per token for the LM
  objectives); `count` is passed through as `tokens` for throughput logs;
  macro_f1 (the unweighted mean of per-class F1) when a confusion matrix is
  among the sums; grad_norm, param_norm and update_norm (means over the
  steps summed) when the train step's norm sums are.
  """
  sums = dict(jax.device_get(sums))
  confusion = sums.pop("confusion", None)
  sums = {k: float(v) for k, v in sums.items()}
  out = {}
  count = sums.get("count", 0.0)
  if count > 0:
    out["loss"] = sums["loss_sum"] / count
    out["accuracy"] = sums["correct"] / count
    out["perplexity"] = math.exp(min(out["loss"], 700.0))  # exp overflows past ~709
  out["tokens"] = count
  nsp_count = sums.get("nsp_count", 0.0)
  if nsp_count > 0:
    out["nsp_loss"] = sums["nsp_loss_sum"] / nsp_count
    out["nsp_accuracy"] = sums["nsp_correct"] / nsp_count
  if confusion is not None:
    out["macro_f1"] = float(np.mean(f1_scores(confusion)))
  steps = sums.get("steps", 0.0)
  for name in NORMS:
    if steps > 0 and f"{name}_sum" in sums:
      out[name] = sums[f"{name}_sum"] / steps  # mean over the window's steps
  return out


# Global norms the train step reports (grad_norm_sum etc., with `steps`).
NORMS = ("grad_norm", "param_norm", "update_norm")
