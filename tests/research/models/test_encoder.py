"""Encoder: bidirectionality, padding invariance, heads, kernel parity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.research.models import build_model, init_params, random_params
from fusedlm.research.models import config as model_config
from fusedlm.research.models.encoder import Encoder

VOCAB = 53


def _config(**changes):
  return model_config.tiny_bert(
      vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
      max_len=32, dtype="float32", attention="xla").replace(**changes)


def _batch(seed, lengths, seq):
  ids = jax.random.randint(jax.random.key(seed), (len(lengths), seq), 0, VOCAB)
  lengths = jnp.array(lengths)[:, None]
  padding_mask = jnp.arange(seq)[None] < lengths
  token_type_ids = (jnp.arange(seq)[None] >= lengths // 2).astype(jnp.int32)
  return ids, token_type_ids, padding_mask


def test_every_output_depends_on_later_inputs():
  cfg = _config(norm="pre", position="rotary")
  model = Encoder(cfg)
  params = {"params": random_params(cfg)}
  ids, token_types, _ = _batch(1, [8], 8)
  x = jax.jit(model.apply, static_argnames="method")(
      params, ids, token_types, method="embed")

  @jax.jit
  def input_gradient(x, t):
    def probe(x):
      hidden = model.apply(params, x, method="hidden_states")
      return jnp.sum(hidden[0, t])
    return jax.grad(probe)(x)

  for t in (0, 3):
    grad = np.asarray(input_gradient(x, t))
    # Unlike the decoder's, position t sees every position, later ones included.
    assert (np.abs(grad[0]).max(axis=-1) > 0).all(), t


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_real_positions_ignore_what_padding_holds(norm):
  cfg = _config(norm=norm, num_labels=3)
  model = build_model(cfg)
  params = {"params": random_params(cfg)}
  ids, token_types, padding_mask = _batch(2, [10, 6], 10)
  apply = jax.jit(model.apply)
  outputs = apply(params, ids, token_types, padding_mask)
  other = jnp.where(padding_mask, ids, (ids * 7 + 3) % VOCAB)
  other_types = jnp.where(padding_mask, token_types, 1 - token_types)
  changed = apply(params, other, other_types, padding_mask)
  real = np.asarray(padding_mask)
  for key in ("hidden", "mlm_logits"):
    np.testing.assert_allclose(np.asarray(changed[key])[real],
                               np.asarray(outputs[key])[real], rtol=1e-6, atol=1e-6)
  for key in ("nsp_logits", "class_logits"):
    np.testing.assert_allclose(changed[key], outputs[key], rtol=1e-6, atol=1e-6)
  # The padded positions themselves did change, so the check above can fail.
  assert np.abs(np.asarray(changed["hidden"] - outputs["hidden"])[~real]).max() > 1e-3


@pytest.mark.parametrize("mlm, nsp, num_labels", [
    (True, True, 0), (True, False, 0), (False, False, 4), (False, False, 0)])
def test_outputs_hold_the_heads_the_config_asks_for(mlm, nsp, num_labels):
  cfg = _config(mlm=mlm, nsp=nsp, num_labels=num_labels)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  ids, token_types, padding_mask = _batch(3, [5, 4], 5)
  outputs = jax.eval_shape(
      lambda p, *inputs: build_model(cfg).apply({"params": p}, *inputs),
      params, ids, token_types, padding_mask)
  expected = {"hidden": ((2, 5, 32), jnp.float32)}
  if mlm:
    expected["mlm_logits"] = ((2, 5, VOCAB), jnp.float32)
  if nsp:
    expected["nsp_logits"] = ((2, 2), jnp.float32)
  if num_labels:
    expected["class_logits"] = ((2, num_labels), jnp.float32)
  assert {k: (v.shape, v.dtype) for k, v in outputs.items()} == expected
  assert ("pooler" in params) == (nsp or num_labels > 0)


def test_mlm_logits_at_gathered_positions_equal_those_of_a_full_call():
  cfg = _config(nsp=True)
  model = build_model(cfg)
  params = {"params": random_params(cfg)}
  batch = _batch(6, [9, 6], 9)
  positions = jnp.array([[0, 4, 8, 9], [5, 2, 9, 9]], jnp.int32)  # 9 = an empty slot
  apply = jax.jit(model.apply)
  full = apply(params, *batch)
  gathered = apply(params, *batch, mlm_positions=positions)
  assert gathered["mlm_logits"].shape == (2, 4, VOCAB)
  np.testing.assert_array_equal(gathered["mlm_positions"], positions)
  expected = np.take_along_axis(np.asarray(full["mlm_logits"]),
                                np.minimum(positions, 8)[..., None], 1)
  filled = np.asarray(positions < 9)
  np.testing.assert_allclose(np.asarray(gathered["mlm_logits"])[filled],
                             expected[filled], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gathered["nsp_logits"], full["nsp_logits"], rtol=1e-6)

  def empty_slots(params):  # reads the trunk only through filled slots
    logits = model.apply(params, *batch, mlm_positions=positions)["mlm_logits"]
    return jnp.sum(jnp.where(filled[..., None], 0.0, logits))

  grads = jax.grad(empty_slots)(params)["params"]
  assert np.abs(np.asarray(grads["mlm_bias"])).max() > 0  # so the check can fail
  for leaf in jax.tree_util.tree_leaves(grads["transformer"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_classify_equals_the_class_logits_of_a_full_call():
  cfg = _config(num_labels=3)
  model = build_model(cfg)
  params = {"params": random_params(cfg)}
  batch = _batch(4, [7, 5], 7)
  apply = jax.jit(model.apply, static_argnames="method")
  np.testing.assert_allclose(
      apply(params, *batch, method="classify"),
      apply(params, *batch)["class_logits"], rtol=1e-6, atol=1e-6)


def test_pallas_and_xla_agree_on_outputs_and_gradients():
  cfg = _config(num_kv_heads=2)
  params = random_params(cfg)
  ids, token_types, padding_mask = _batch(5, [18, 11], 18)

  def loss_and_outputs(params, attention):
    outputs = Encoder(cfg.replace(attention=attention)).apply(
        {"params": params}, ids, token_types, padding_mask)
    loss = jnp.mean(jax.nn.logsumexp(outputs["mlm_logits"], -1)) + jnp.sum(
        outputs["nsp_logits"][:, 0])
    return loss, outputs

  grad_fn = jax.jit(jax.value_and_grad(loss_and_outputs, has_aux=True),
                    static_argnums=1)
  (_, outputs_x), grads_x = grad_fn(params, "xla")
  (_, outputs_p), grads_p = grad_fn(params, "pallas")
  chex.assert_trees_all_close(outputs_p, outputs_x, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads_p, grads_x, rtol=1e-4, atol=1e-6)
