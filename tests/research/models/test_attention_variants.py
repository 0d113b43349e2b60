"""The config's attention variants through the kernel: attention dropout, sliding
window, soft-cap, T5 relative position bias; trained a few steps in Pallas'
interpreter, and held to the "xla" implementation (which draws the same
dropout bits)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusedlm.research import models
from fusedlm.research.models import config as model_config
from fusedlm.research.models.attention import (
    AttentionMask,
    LayerCache,
    SelfAttention,
    relative_position_buckets,
)

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
            mlp_dim=64, max_len=32, dtype="float32")


def _mlm_loss(model, params, batch, rng=None):
  rngs = None if rng is None else {"dropout": rng}
  logits = model.apply({"params": params}, batch["input_ids"],
                       deterministic=rng is None, rngs=rngs)["mlm_logits"]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["labels"]).mean()


def _causal_loss(model, params, tokens, rng=None):
  rngs = None if rng is None else {"dropout": rng}
  logits = model.apply({"params": params}, tokens[:, :-1],
                       deterministic=rng is None, rngs=rngs)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


def _train(loss, params, steps=4):
  """A few Adam steps; returns the losses before each step."""
  tx = optax.adam(3e-3)
  state = tx.init(params)
  step = jax.jit(lambda params, state, i: _update(loss, tx, params, state, i))
  losses = []
  for i in range(steps):
    value, params, state = step(params, state, i)
    losses.append(float(value))
  return losses


def _update(loss, tx, params, state, i):
  value, grads = jax.value_and_grad(loss)(params, jax.random.fold_in(
      jax.random.key(0), i))
  updates, state = tx.update(grads, state, params)
  return value, optax.apply_updates(params, updates), state


def test_bert_with_attention_dropout_trains_through_the_kernel():
  cfg = model_config.tiny_bert(**TINY, nsp=False, attention_dropout=0.1,
                               attention="pallas")
  model = models.build_model(cfg)
  params = models.random_params(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  batch = {"input_ids": tokens, "labels": jnp.roll(tokens, 1, axis=1)}
  rng = jax.random.key(5)
  train_loss = _mlm_loss(model, params, batch, rng)
  # Hidden dropout is 0: only attention dropout makes training noisy, and
  # the "xla" implementation draws the very same bits.
  assert float(train_loss) != float(_mlm_loss(model, params, batch,
                                              jax.random.key(6)))
  xla = models.build_model(cfg.replace(attention="xla"))
  np.testing.assert_allclose(train_loss, _mlm_loss(xla, params, batch, rng),
                             rtol=1e-5)
  # Evaluation (no dropout stream) is deterministic and dropout-free.
  eval_loss = _mlm_loss(model, params, batch)
  np.testing.assert_allclose(eval_loss, _mlm_loss(xla, params, batch), rtol=1e-5)
  no_dropout = models.build_model(cfg.replace(attention_dropout=0.0))
  np.testing.assert_allclose(eval_loss, _mlm_loss(no_dropout, params, batch),
                             rtol=1e-6)
  losses = _train(lambda p, r: _mlm_loss(model, p, batch, r), params)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_decoder_with_sliding_window_and_soft_cap_trains_through_the_kernel():
  cfg = model_config.tiny_gpt(**TINY, position="rotary", num_kv_heads=1,
                              sliding_window=4, attention_soft_cap=5.0,
                              attention="pallas")
  model = models.build_model(cfg)
  params = models.random_params(cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, cfg.vocab_size)
  loss = _causal_loss(model, params, tokens)
  xla = models.build_model(cfg.replace(attention="xla"))
  np.testing.assert_allclose(loss, _causal_loss(xla, params, tokens), rtol=1e-5)
  plain = models.build_model(cfg.replace(sliding_window=0, attention_soft_cap=0.0))
  assert abs(float(loss) - float(_causal_loss(plain, params, tokens))) > 1e-4
  losses = _train(lambda p, r: _causal_loss(model, p, tokens), params)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_sliding_window_bounds_what_a_position_sees():
  # One layer, window 3: the output at t depends on inputs t-2..t only.
  cfg = model_config.tiny_gpt(**{**TINY, "num_layers": 1}, position="rotary",
                              sliding_window=3, attention="xla")
  model = models.build_model(cfg)
  params = models.random_params(cfg)
  x = jax.random.normal(jax.random.key(3), (1, 10, cfg.hidden_size))
  out_at = lambda x, t: model.apply({"params": params}, x,
                                   method="hidden_states")[0, t].sum()
  grad = jax.grad(out_at)(x, 7)
  seen = np.abs(np.asarray(grad[0])).sum(axis=-1) > 0
  np.testing.assert_array_equal(seen, [False] * 5 + [True] * 3 + [False] * 2)


def test_windowed_decoding_over_a_cache_matches_the_full_sequence():
  cfg = model_config.tiny_gpt(**{**TINY, "num_layers": 1}, position="rotary",
                              num_kv_heads=1, sliding_window=3, attention="xla")
  x = jax.random.normal(jax.random.key(4), (1, 6, cfg.hidden_size))
  positions = jnp.arange(6)[None]
  apply = jax.jit(SelfAttention(cfg).apply)
  params = {"params": models.random_params(cfg)["transformer"]["layer_0"]
            ["attention"]}
  full, kv = apply(params, x, positions, AttentionMask(causal=True))
  cache = LayerCache(kv.keys[:, :5], kv.values[:, :5]).padded_to(8)
  last, _ = apply(params, x[:, 5:], positions[:, 5:],
                  AttentionMask(key_padding_mask=jnp.arange(8)[None] <= 5),
                  cache, jnp.array([5]))
  np.testing.assert_allclose(last[:, 0], full[:, 5], rtol=1e-5, atol=1e-6)


def test_t5_relative_position_buckets():
  relative = jnp.array([0, -1, 1, -7, 8, -100, 100, -1000])
  np.testing.assert_array_equal(
      relative_position_buckets(relative, True, 32, 128),
      [0, 1, 17, 7, 24, 15, 31, 15])
  np.testing.assert_array_equal(
      relative_position_buckets(jnp.array([5, 0, -5, -20, -1000]), False, 32, 128),
      [0, 0, 5, 17, 31])


def test_encoder_with_relative_position_bias_trains_through_the_kernel():
  cfg = model_config.tiny_bert(**TINY, nsp=False, position="relative",
                               attention="pallas")
  model = models.build_model(cfg)
  params = models.random_params(cfg)
  assert "position" not in params["embeddings"]
  tokens = jax.random.randint(jax.random.key(7), (2, 12), 0, cfg.vocab_size)
  batch = {"input_ids": tokens, "labels": jnp.roll(tokens, 1, axis=1)}
  loss, grads = jax.value_and_grad(lambda p: _mlm_loss(model, p, batch))(params)
  xla = models.build_model(cfg.replace(attention="xla"))
  want, want_grads = jax.value_and_grad(lambda p: _mlm_loss(xla, p, batch))(params)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  table_grad = grads["transformer"]["layer_0"]["attention"]["relative_bias"]["embedding"]
  assert np.abs(np.asarray(table_grad)).max() > 0
  np.testing.assert_allclose(
      table_grad,
      want_grads["transformer"]["layer_0"]["attention"]["relative_bias"]["embedding"],
      rtol=1e-4, atol=1e-7)
