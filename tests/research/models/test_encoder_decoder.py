"""Encoder-decoder: what each attention sees, packing, kernel parity, cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm.research.models import abstract_params, build_model, count_params, random_params
from fusedlm.research.models import config as model_config
from fusedlm.research.models.attention import AttentionMask, CrossAttention
from fusedlm.research.models.encoder_decoder import EncoderDecoder

VOCAB = 53


def _config(**changes):
  return model_config.tiny_seq2seq(
      vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
      mlp_dim=64, max_len=24, dtype="float32", attention="xla").replace(**changes)


def _tokens(seed, shape, low=1):
  return jax.random.randint(jax.random.key(seed), shape, low, VOCAB, jnp.int32)


def _source_and_mask():
  """Two sources of 7 and 4 real tokens, right-padded with garbage to 9."""
  source = _tokens(1, (2, 9))
  mask = jnp.array([[True] * 7 + [False] * 2, [True] * 4 + [False] * 5])
  return source, mask


def _decode_from_embeddings(module, x, source_x, source_mask):
  """Logits [B, T, V] from target and source embeddings (no lookups in between)."""
  positions = jnp.broadcast_to(jnp.arange(source_x.shape[1]), source_x.shape[:2])
  memory, _ = module.encoder(
      source_x, positions, AttentionMask(key_padding_mask=source_mask), True)
  target_positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  hidden, _, _ = module.decoder(
      x, target_positions, AttentionMask(causal=True), True, memory=memory,
      memory_mask=AttentionMask(key_padding_mask=source_mask))
  return module.target_embeddings.attend(hidden)


def _embedded(model, params, ids):
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  return model.apply({"params": params}, ids, positions,
                     method=lambda m, i, p: m.source_embeddings(i, p))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_cross_attention_sees_every_source_token_and_no_padded_one(norm):
  cfg = _config(norm=norm)
  model = EncoderDecoder(cfg)
  params = random_params(cfg)
  source, mask = _source_and_mask()
  target = _tokens(2, (2, 6))
  source_x = _embedded(model, params, source)
  target_x = model.apply({"params": params}, target, jnp.broadcast_to(
      jnp.arange(6), target.shape), method=lambda m, i, p: m.target_embeddings(i, p))
  direction = jax.random.normal(jax.random.key(3), (VOCAB,))

  @jax.jit
  def source_gradient(source_x, t):  # d <logits[:, t], direction> / d source
    def probe(source_x):
      logits = model.apply({"params": params}, target_x, source_x, mask,
                           method=_decode_from_embeddings)
      return jnp.sum(logits[:, t] @ direction)
    return jax.grad(probe)(source_x)

  for t in range(6):  # the first target position too: it reads the source only
    grad = np.abs(np.asarray(source_gradient(source_x, t))).max(axis=-1)  # [B, S]
    np.testing.assert_array_equal(grad[~np.asarray(mask)], 0.0)
    assert (grad[np.asarray(mask)] > 0).all(), (t, grad)

  # The padded source tokens' values do not matter at all, bit for bit.
  other = jnp.where(mask, source, _tokens(4, source.shape))
  apply = jax.jit(lambda s: model.apply({"params": params}, s, target,
                                        source_padding_mask=mask))
  np.testing.assert_array_equal(apply(source), apply(other))


def test_decoder_output_has_zero_gradient_wrt_later_target_tokens():
  cfg = _config(position="rotary")
  model = EncoderDecoder(cfg)
  params = random_params(cfg)
  source, mask = _source_and_mask()
  source_x = _embedded(model, params, source)
  target_x = jax.random.normal(jax.random.key(5), (2, 10, cfg.hidden_size))
  direction = jax.random.normal(jax.random.key(6), (VOCAB,))

  @jax.jit
  def target_gradient(x, t):
    def probe(x):
      logits = model.apply({"params": params}, x, source_x, mask,
                           method=_decode_from_embeddings)
      return jnp.sum(logits[0, t] @ direction)
    return jax.grad(probe)(x)

  for t in (0, 4, 9):
    grad = np.asarray(target_gradient(target_x, t))
    np.testing.assert_array_equal(grad[0, t + 1:], 0.0)
    np.testing.assert_array_equal(grad[1], 0.0)  # rows are independent
    assert (np.abs(grad[0, :t + 1]).max(axis=-1) > 0).all(), t


def test_packed_pairs_match_each_pair_alone():
  cfg = _config()
  model = build_model(cfg)
  params = random_params(cfg)
  apply = jax.jit(lambda s, t, **kw: model.apply({"params": params}, s, t, **kw))
  src_a, src_b = _tokens(7, (1, 5)), _tokens(8, (1, 3))
  tgt_a, tgt_b = _tokens(9, (1, 4)), _tokens(10, (1, 6))
  pad = lambda n: jnp.zeros((1, n), jnp.int32)
  source = jnp.concatenate([src_a, src_b, pad(2)], axis=1)
  target = jnp.concatenate([tgt_a, tgt_b, pad(1)], axis=1)
  source_segments = jnp.array([[1] * 5 + [2] * 3 + [0] * 2])
  target_segments = jnp.array([[1] * 4 + [2] * 6 + [0]])
  packed = apply(
      source, target, source_padding_mask=source_segments > 0,
      source_positions=jnp.array([[*range(5), *range(3), 0, 0]]),
      target_positions=jnp.array([[*range(4), *range(6), 0]]),
      source_segment_ids=source_segments, target_segment_ids=target_segments)
  np.testing.assert_allclose(packed[:, :4], apply(src_a, tgt_a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, 4:10], apply(src_b, tgt_b), rtol=1e-5, atol=1e-5)


def test_pallas_interpreter_and_xla_agree_on_logits_and_gradients():
  cfg = _config(position="rotary")
  params = random_params(cfg)
  source, mask = _source_and_mask()
  target = _tokens(11, (2, 17))  # not a multiple of the kernel's tiles
  labels = _tokens(12, target.shape)

  def loss_and_logits(attention):
    model = build_model(cfg.replace(attention=attention))

    def loss(params):
      logits = model.apply({"params": params}, source, target, source_padding_mask=mask)
      log_probs = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], -1)), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (xla_loss, xla_logits), xla_grads = loss_and_logits("xla")
  (pallas_loss, pallas_logits), pallas_grads = loss_and_logits("pallas")
  np.testing.assert_allclose(pallas_logits, xla_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pallas_loss, xla_loss, rtol=1e-5)
  for path, want in jax.tree_util.tree_leaves_with_path(xla_grads):
    got = dict(jax.tree_util.tree_leaves_with_path(pallas_grads))[path]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_cached_decoding_steps_equal_the_full_forward_pass():
  cfg = _config(norm="post")
  model = build_model(cfg)
  params = random_params(cfg)
  source, mask = _source_and_mask()
  target = _tokens(13, (2, 8))
  full = jax.jit(lambda: model.apply({"params": params}, source, target,
                                     source_padding_mask=mask))()
  logits, cache = model.apply({"params": params}, source, mask, target[:, 0],
                              max_len=8, method="start_decoding")
  steps = [logits[:, 0]]
  step = jax.jit(lambda token, cache: model.apply(
      {"params": params}, token, cache, method="decode_step"))
  for t in range(1, 8):
    logits, cache = step(target[:, t:t + 1], cache)
    steps.append(logits[:, 0])
  np.testing.assert_allclose(np.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
  logits, _ = step(target[:, :1], cache)  # a ninth token has no slot
  assert np.isnan(np.asarray(logits)).all()


def test_shared_and_separate_embeddings():
  shared, separate = _config(), _config(share_embeddings=False)
  tree = abstract_params(shared)
  assert "token" not in tree["source_embeddings"]
  assert "token" not in tree["target_embeddings"]
  assert tree["token_embedding"]["embedding"].shape == (VOCAB, 32)
  tree = abstract_params(separate)
  assert "token_embedding" not in tree
  assert tree["source_embeddings"]["token"]["embedding"].shape == (VOCAB, 32)
  assert tree["target_embeddings"]["token"]["embedding"].shape == (VOCAB, 32)
  assert count_params(separate) - count_params(shared) == VOCAB * 32
  assert set(tree["decoder"]["layer_0"]) == {
      "attention", "attention_norm", "cross_attention", "cross_attention_norm",
      "mlp", "mlp_norm"}
  assert set(tree["encoder"]["layer_0"]) == {
      "attention", "attention_norm", "mlp", "mlp_norm"}


def test_presets_and_refusals():
  assert count_params(model_config.tiny_seq2seq()) == 1_073_664
  assert count_params(model_config.transformer_base()) == 60_786_688
  with pytest.raises(ValueError, match="no classification head"):
    model_config.tiny_seq2seq(num_labels=3)
  with pytest.raises(ValueError, match="exceeds the learned position table"):
    model = build_model(_config())
    model.apply({"params": random_params(_config())}, *_source_and_mask(),
                jnp.zeros((2,), jnp.int32), max_len=25, method="start_decoding")


def test_attention_dropout_reaches_cross_attention_in_training_only():
  cfg = _config(attention_dropout=0.5)
  source, mask = _source_and_mask()
  memory = jax.random.normal(jax.random.key(15), (2, 9, 32))
  x = jax.random.normal(jax.random.key(16), (2, 5, 32))
  memory_mask = AttentionMask(key_padding_mask=mask)
  layer = CrossAttention(cfg)
  params = layer.init(jax.random.key(0), x, memory_mask, memory)["params"]

  def apply(cfg, **kw):
    return CrossAttention(cfg).apply({"params": params}, x, memory_mask, memory, **kw)[0]

  np.testing.assert_array_equal(apply(cfg), apply(cfg.replace(attention_dropout=0.0)))
  dropped = [apply(cfg, deterministic=False, rngs={"dropout": jax.random.key(k)})
             for k in (0, 1)]
  assert np.abs(np.asarray(dropped[0] - dropped[1])).max() > 1e-3
