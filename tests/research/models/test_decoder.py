"""Decoder: causality, packing, kernel parity, KV-cache decoding, classification."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.research.models import build_model, random_params
from fusedlm.research.models import config as model_config
from fusedlm.research.models.decoder import Decoder

VOCAB = 61


def _config(**changes):
  return model_config.tiny_gpt(
      vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
      num_kv_heads=2, mlp_dim=64, max_len=32, dtype="float32",
      attention="xla").replace(**changes)


def _tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_output_at_t_has_zero_gradient_wrt_later_inputs(attention):
  cfg = _config(attention=attention, position="rotary")
  model = Decoder(cfg)
  params = random_params(cfg)
  ids = _tokens(1, (2, 10))
  x = jax.jit(model.apply, static_argnames="method")(
      {"params": params}, ids, jnp.broadcast_to(jnp.arange(10), ids.shape),
      method="embed")
  direction = jax.random.normal(jax.random.key(2), (cfg.hidden_size,))

  @jax.jit
  def input_gradient(x, t):  # d <hidden[0, t], direction> / d x
    def probe(x):
      hidden = model.apply({"params": params}, x, method="hidden_states")
      return jnp.sum(hidden[0] * jax.nn.one_hot(t, 10)[:, None] * direction)
    return jax.grad(probe)(x)

  for t in (0, 4, 8):
    grad = np.asarray(input_gradient(x, t))
    np.testing.assert_array_equal(grad[0, t + 1:], 0.0)
    np.testing.assert_array_equal(grad[1], 0.0)  # rows are independent
    assert (np.abs(grad[0, :t + 1]).max(axis=-1) > 0).all(), t


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_packed_documents_match_each_document_alone(position):
  cfg = _config(position=position)
  model = build_model(cfg)
  params = random_params(cfg)
  doc_a, doc_b = _tokens(3, (1, 5)), _tokens(4, (1, 7))
  packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 4), jnp.int32)], axis=1)
  segment_ids = jnp.array([[1] * 5 + [2] * 7 + [0] * 4])
  positions = jnp.array([list(range(5)) + list(range(7)) + [0] * 4])
  apply = jax.jit(lambda ids, **kw: model.apply({"params": params}, ids, **kw))
  together = apply(packed, positions=positions, segment_ids=segment_ids)
  np.testing.assert_allclose(together[:, :5], apply(doc_a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(together[:, 5:12], apply(doc_b), rtol=1e-5, atol=1e-5)


def _parity_inputs(cfg):
  params = random_params(cfg)
  ids = _tokens(5, (2, 20))  # 20: not a multiple of the kernel's 16-row tiles
  segment_ids = jnp.array([[1] * 12 + [2] * 8, [1] * 17 + [0] * 3])
  positions = jnp.array([list(range(12)) + list(range(8)), list(range(17)) + [0] * 3])
  return params, ids, segment_ids, positions


def test_pallas_and_xla_agree_on_logits_and_gradients():
  cfg = _config(position="rotary")
  params, ids, segment_ids, positions = _parity_inputs(cfg)
  targets = _tokens(6, ids.shape)

  def loss_and_logits(params, attention):
    logits = Decoder(cfg.replace(attention=attention)).apply(
        {"params": params}, ids, positions=positions, segment_ids=segment_ids)
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], -1))
    return loss, logits

  grad_fn = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True),
                    static_argnums=1)
  (loss_x, logits_x), grads_x = grad_fn(params, "xla")
  (loss_p, logits_p), grads_p = grad_fn(params, "pallas")
  np.testing.assert_allclose(logits_p, logits_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss_p, loss_x, rtol=1e-6)
  chex.assert_trees_all_close(grads_p, grads_x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention, position, remat", [
    ("xla", "learned", False),
    ("xla", "rotary", True),
    ("pallas", "rotary", False),
])
def test_cached_decoding_matches_the_full_forward(attention, position, remat):
  cfg = _config(attention=attention, position=position, remat=remat)
  model = build_model(cfg)
  params = {"params": random_params(cfg)}
  sequences = _tokens(7, (2, 11))
  full_logits = jax.jit(model.apply)(params, sequences)  # [2, 11, V]
  lengths = jnp.array([6, 3])  # prompts right-padded to 6
  prompts = jnp.where(jnp.arange(6) < lengths[:, None], sequences[:, :6], 0)
  prefill = jax.jit(functools.partial(
      model.apply, method="prefill", max_len=16))
  step = jax.jit(functools.partial(model.apply, method="decode_step"))

  logits, cache = prefill(params, prompts, lengths)
  rows = jnp.arange(2)
  np.testing.assert_allclose(
      logits[:, 0], full_logits[rows, lengths - 1], rtol=1e-5, atol=1e-5)
  for k in range(5):
    at = lengths + k
    logits, cache = step(params, sequences[rows, at][:, None], cache)
    np.testing.assert_allclose(
        logits[:, 0], full_logits[rows, at], rtol=1e-5, atol=1e-5,
        err_msg=f"decoding step {k}")
  np.testing.assert_array_equal(cache.lengths, lengths + 5)


def test_decoding_past_the_cache_gives_nan_not_a_silent_overwrite():
  cfg = _config(position="rotary")
  model = build_model(cfg)
  params = {"params": random_params(cfg)}
  prefill = jax.jit(functools.partial(model.apply, max_len=5, method="prefill"))
  step = jax.jit(functools.partial(model.apply, method="decode_step"))
  logits, cache = prefill(params, _tokens(8, (2, 4)), jnp.array([4, 2]))
  logits, cache = step(params, jnp.ones((2, 1), jnp.int32), cache)
  assert np.isfinite(logits).all()
  logits, _ = step(params, jnp.ones((2, 1), jnp.int32), cache)
  assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()


def test_prefill_rejects_caches_that_cannot_hold_the_prompt():
  model = build_model(_config())
  params = {"params": random_params(_config())}
  prompt = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="shorter than the prompt"):
    model.apply(params, prompt, max_len=4, method="prefill")
  with pytest.raises(ValueError, match="learned position table"):
    model.apply(params, prompt, max_len=64, method="prefill")


def test_classification_pools_the_last_real_token():
  cfg = _config(num_labels=3)
  model = build_model(cfg)
  params = {"params": random_params(cfg)}
  assert params["params"]["classifier"]["dense"]["kernel"].shape == (32, 3)
  ids = _tokens(9, (2, 8))
  padding_mask = jnp.arange(8)[None] < jnp.array([[8], [5]])
  classify = jax.jit(functools.partial(model.apply, method="classify"))
  logits = classify(params, ids, None, padding_mask)
  chex.assert_shape(logits, (2, 3))
  # Padding content does not matter ...
  scrambled = jnp.where(padding_mask, ids, _tokens(10, ids.shape))
  np.testing.assert_allclose(classify(params, scrambled, None, padding_mask),
                             logits, rtol=1e-6, atol=1e-6)
  # ... and row 1 reads position 4, the same as classifying its 5 real tokens.
  alone = classify(params, ids[1:, :5], None, None)
  np.testing.assert_allclose(logits[1:], alone, rtol=1e-5, atol=1e-6)
