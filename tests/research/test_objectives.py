"""Objectives: masked means, ignored positions, metric sums, summaries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.research import models, objectives
from fusedlm.research.models import config as model_config
from fusedlm.research.objectives.chunked_loss import chunked_lm_cross_entropy


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _reference_nll(logits, labels):
  return -np.take_along_axis(_log_softmax(logits), np.asarray(labels)[..., None],
                             -1)[..., 0]


def _causal_batch():
  rng = np.random.RandomState(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.randint(0, 7, (2, 5)).astype(np.int32)
  loss_mask = np.array([[1, 1, 1, 0, 1], [1, 1, 0, 0, 0]], np.float32)
  return logits, {"targets": targets, "loss_mask": loss_mask}


def test_causal_loss_is_the_mean_over_kept_positions():
  logits, batch = _causal_batch()
  loss, metrics = objectives.causal_lm_loss(jnp.asarray(logits), batch)
  nll = _reference_nll(logits, batch["targets"])
  kept = batch["loss_mask"] > 0
  np.testing.assert_allclose(loss, nll[kept].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_sum"], nll[kept].sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["count"], 6.0)
  hits = (logits.argmax(-1) == batch["targets"])[kept].sum()
  np.testing.assert_allclose(metrics["correct"], hits)


def test_masked_positions_neither_count_nor_poison_the_loss():
  logits, batch = _causal_batch()
  loss, _ = objectives.causal_lm_loss(jnp.asarray(logits), batch)
  dropped = batch["loss_mask"] == 0
  bad_logits = np.where(dropped[..., None], np.nan, logits)
  bad_targets = np.where(dropped, -100, batch["targets"])  # out of range
  bad_loss, metrics = objectives.causal_lm_loss(
      jnp.asarray(bad_logits), {**batch, "targets": bad_targets})
  np.testing.assert_allclose(bad_loss, loss, rtol=1e-6)
  assert np.isfinite(metrics["correct"])
  grads = jax.grad(lambda l: objectives.causal_lm_loss(l, batch)[0])(
      jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(grads)[dropped], 0.0)


def test_mlm_loss_adds_nsp_and_ignores_unmasked_positions():
  rng = np.random.RandomState(1)
  mlm_logits = rng.normal(size=(2, 4, 9)).astype(np.float32)
  nsp_logits = rng.normal(size=(2, 2)).astype(np.float32)
  batch = {
      "mlm_labels": np.array([[3, -100, 5, 0], [1, 2, -100, -100]], np.int32),
      "mlm_weights": np.array([[1, 0, 1, 0], [1, 1, 1, 0]], np.float32),
      "nsp_labels": np.array([0, 1], np.int32),
  }
  outputs = {"mlm_logits": jnp.asarray(mlm_logits),
             "nsp_logits": jnp.asarray(nsp_logits)}
  nll = _reference_nll(mlm_logits, np.maximum(batch["mlm_labels"], 0))
  # Position [1, 2] has weight 1 but label -100: HF's ignore index wins.
  used = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], bool)
  nsp_nll = _reference_nll(nsp_logits, batch["nsp_labels"])
  loss, metrics = objectives.mlm_loss(outputs, batch, nsp=True)
  np.testing.assert_allclose(loss, nll[used].mean() + nsp_nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["count"], 4.0)
  np.testing.assert_allclose(metrics["nsp_loss_sum"], nsp_nll.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["nsp_count"], 2.0)
  loss_only, metrics_only = objectives.mlm_loss(outputs, batch, nsp=False)
  np.testing.assert_allclose(loss_only, nll[used].mean(), rtol=1e-5)
  assert "nsp_loss_sum" not in metrics_only


def test_mlm_loss_at_gathered_positions_equals_the_loss_at_every_position():
  rng = np.random.RandomState(2)
  logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
  weights = np.array([[0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1]],
                     np.float32)
  batch = {"mlm_labels": rng.randint(0, 11, (3, 6)).astype(np.int32),
           "mlm_weights": weights,
           "weights": np.array([1, 1, 0], np.float32)}  # the last row is padding
  positions = np.full((3, 4), 6, np.int32)  # 6 = an empty slot
  for row, chosen in enumerate(weights > 0):
    positions[row, :chosen.sum()] = np.flatnonzero(chosen)
  # What an empty slot holds never counts, not even NaN.
  gathered = np.take_along_axis(logits, np.minimum(positions, 5)[..., None], 1)
  gathered = np.where((positions < 6)[..., None], gathered, np.nan)
  loss, metrics = objectives.mlm_loss(
      {"mlm_logits": jnp.asarray(gathered), "mlm_positions": jnp.asarray(positions)},
      batch)
  full_loss, full_metrics = objectives.mlm_loss({"mlm_logits": jnp.asarray(logits)}, batch)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
  for key in ("loss_sum", "correct", "count"):
    np.testing.assert_allclose(metrics[key], full_metrics[key], rtol=1e-6)
  np.testing.assert_allclose(metrics["count"], 4.0)


def test_classification_loss_weights_out_padded_examples():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
  batch = {"labels": np.array([0, 2, 1]), "weights": np.array([1.0, 1.0, 0.0])}
  loss, metrics = objectives.classification_loss(logits, batch)
  nll = _reference_nll(logits, batch["labels"])
  np.testing.assert_allclose(loss, nll[:2].mean(), rtol=1e-6)
  np.testing.assert_allclose([metrics["correct"], metrics["count"]], [1.0, 2.0])


def test_summaries_of_summed_batches_equal_the_pooled_mean():
  logits, batch = _causal_batch()
  halves = [objectives.causal_lm_loss(jnp.asarray(logits[i:i + 1]),
                                      {k: v[i:i + 1] for k, v in batch.items()})[1]
            for i in (0, 1)]
  summed = jax.tree_util.tree_map(lambda a, b: a + b, *halves)
  loss, _ = objectives.causal_lm_loss(jnp.asarray(logits), batch)
  summary = objectives.summarize(summed)
  np.testing.assert_allclose(summary["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(summary["perplexity"], math.exp(summary["loss"]),
                             rtol=1e-12)
  assert summary["tokens"] == 6.0
  assert "nsp_loss" not in summary


def test_summary_reports_nsp_and_survives_empty_sums():
  summary = objectives.summarize({
      "loss_sum": 6.0, "correct": 1.0, "count": 3.0,
      "nsp_loss_sum": 1.0, "nsp_correct": 3.0, "nsp_count": 4.0})
  assert summary == pytest.approx({
      "loss": 2.0, "accuracy": 1 / 3, "perplexity": math.exp(2.0),
      "tokens": 3.0, "nsp_loss": 0.25, "nsp_accuracy": 0.75})
  assert objectives.summarize({"loss_sum": 0.0, "correct": 0.0,
                               "count": 0.0}) == {"tokens": 0.0}


def test_the_registry_picks_the_loss_by_objective_name():
  logits, batch = _causal_batch()
  np.testing.assert_allclose(
      objectives.get("causal").loss(jnp.asarray(logits), batch, None)[0],
      objectives.causal_lm_loss(jnp.asarray(logits), batch)[0])
  assert set(objectives.REGISTRY) == {"causal", "mlm", "classification", "qa", "seq2seq",
                                      "summarization"}
  assert all(name == o.name for name, o in objectives.REGISTRY.items())
  with pytest.raises(ValueError, match="unknown objective 'contrastive'"):
    objectives.get("contrastive")


def test_confusion_matrix_and_macro_f1_match_a_hand_count():
  logits = jnp.asarray(np.eye(3, dtype=np.float32)[[0, 1, 1, 2, 0, 2]])  # predictions
  labels = jnp.asarray([0, 1, 2, 2, 1, 0])
  weights = jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32)  # the last row is padding
  confusion = np.asarray(objectives.confusion_matrix(logits, labels, weights))
  np.testing.assert_array_equal(confusion, [[1, 0, 0], [1, 1, 0], [0, 1, 1]])
  # F1 per class: 2TP / (2TP + FP + FN) = 2/3, 1/2, 2/3.
  np.testing.assert_allclose(objectives.f1_scores(confusion), [2 / 3, 1 / 2, 2 / 3])
  summary = objectives.summarize({"loss_sum": 1.0, "correct": 3.0, "count": 5.0,
                                  "confusion": confusion})
  assert summary["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
  # A class neither true nor predicted scores 0 rather than being skipped.
  np.testing.assert_allclose(objectives.f1_scores(np.diag([2.0, 0.0])), [1.0, 0.0])


def test_span_loss_is_the_mean_of_start_and_end_cross_entropies_over_real_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 2)).astype(np.float32)
  lengths = np.array([6, 4, 5])
  batch = {"padding_mask": np.arange(6)[None] < lengths[:, None],
           "start_positions": np.array([2, 0, 4]), "end_positions": np.array([3, 0, 4]),
           "weights": np.array([1, 1, 0], np.float32)}
  logits[0, 2, 0] = logits[0, 3, 1] = 9.0  # row 0: both ends right
  logits[1, 5, :] = 50.0  # padding: never a prediction, never in the softmax
  loss, sums = objectives.get("qa").loss(jnp.asarray(logits), batch, None)
  want = []
  for row in range(2):
    x = logits[row, :lengths[row]]
    log_p = x - np.log(np.exp(x).sum(0, keepdims=True))
    want.append(-(log_p[batch["start_positions"][row], 0]
                  + log_p[batch["end_positions"][row], 1]) / 2)
  np.testing.assert_allclose(sums["loss_sum"], sum(want), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
  assert float(sums["count"]) == 2.0 and float(sums["correct"]) == 1.0


@pytest.mark.parametrize("chunk", [5, 64])  # 5 divides no length here: a padded chunk
def test_chunked_lm_loss_equals_the_plain_one_in_values_and_gradients(chunk):
  cfg = model_config.tiny_gpt().replace(vocab_size=97, dtype="float32", attention="xla")
  params = models.random_params(cfg, seed=0)
  rng = np.random.RandomState(0)
  inputs = rng.randint(0, 97, (3, 12)).astype(np.int32)
  batch = {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
           "loss_mask": (rng.rand(3, 12) > 0.2).astype(np.float32),
           "weights": np.array([1.0, 1.0, 0.0], np.float32)}  # a padding row

  def loss_and_sums(params, logits_chunk):
    model = models.build_model(cfg.replace(logits_chunk=logits_chunk))
    outputs = objectives.get("causal").outputs(model, {"params": params}, batch)
    return objectives.causal_lm_loss(outputs, batch)

  (plain, plain_sums), plain_grads = jax.value_and_grad(
      lambda p: loss_and_sums(p, 0), has_aux=True)(params)
  (chunked, chunked_sums), chunked_grads = jax.value_and_grad(
      lambda p: loss_and_sums(p, chunk), has_aux=True)(params)
  np.testing.assert_allclose(chunked, plain, rtol=1e-6)
  for key in ("loss_sum", "correct", "count"):
    np.testing.assert_allclose(chunked_sums[key], plain_sums[key], rtol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      chunked_grads, plain_grads)


def test_chunked_cross_entropy_gradients_match_autodiff_of_the_whole_logits():
  """hidden, table and weights, with ignored labels out of range (-100) and a
  padded last chunk: the one-pass gradients are autodiff's of the plain sums."""
  rng = np.random.RandomState(1)
  hidden = jnp.asarray(rng.randn(2, 7, 16), jnp.float32)
  table = jnp.asarray(rng.randn(11, 16) * 0.3, jnp.float32)
  labels = jnp.asarray(rng.randint(0, 11, (2, 7)))
  weights = jnp.asarray((rng.rand(2, 7) > 0.3) * rng.rand(2, 7) * 2, jnp.float32)
  labels = jnp.where(weights > 0, labels, -100)
  cotangent = jnp.asarray([1.5, 0.25, -0.5])  # one each for loss_sum, correct, count

  def plain(hidden, table, weights):
    m = objectives.weighted_cross_entropy(jnp.einsum("bth,vh->btv", hidden, table),
                                          labels, weights)
    return jnp.stack([m["loss_sum"], m["correct"], m["count"]]) @ cotangent

  def chunked(hidden, table, weights):
    m = chunked_lm_cross_entropy(hidden, table, labels, weights, chunk=4, dtype=jnp.float32)
    return jnp.stack([m["loss_sum"], m["correct"], m["count"]]) @ cotangent

  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2))(hidden, table, weights)
  got, got_grads = jax.value_and_grad(chunked, argnums=(0, 1, 2))(hidden, table, weights)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for name, g, w in zip(("hidden", "table", "weights"), got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
