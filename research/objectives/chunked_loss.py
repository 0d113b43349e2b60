"""The LM loss of a tied output layer, a chunk of tokens at a time, with its gradient in one pass.

  sums = chunked_lm_cross_entropy(hidden, table, labels, weights, chunk=4096,
                                  dtype=jnp.bfloat16)

The plain loss materialises the float32 logits hidden @ table^T, [tokens,
vocab] (1.2 GB for GPT-2 small at 12 x 1024 tokens), and their gradient of
the same size. Here only one chunk's logits exist at a time, and no chunk
is computed twice: when the loss is differentiated, the forward pass of each
chunk also takes its gradient (the softmax minus the one-hot label, which
the logits give at once) with respect to the chunk's hidden states and the
output table, as Liger Kernel's fused linear cross-entropy does. The
backward pass then only scales those by the loss's cotangent. Per token
that is the plain loss's three matmuls (logits, d hidden, d table), where
rematerialising each chunk in the backward would cost a fourth.

The sums equal `metrics.weighted_cross_entropy` of the whole logits up to
float32 summation order, and so do the gradients (tests/research/
test_objectives.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedlm.research.objectives.metrics import weighted_cross_entropy


def chunked_lm_cross_entropy(
    hidden,  # [..., features] the final hidden states, compute dtype
    table,  # [vocab, features] the tied output layer (the token embedding)
    labels,  # [...] int
    weights,  # [...] float; 0 = ignore
    *,
    chunk: int,  # tokens a chunk
    dtype,  # the matmul's input dtype (the model's compute dtype)
) -> dict[str, jax.Array]:  # loss_sum, correct, count (float32 scalars)
  """`weighted_cross_entropy` of the logits hidden @ table^T, `chunk` tokens at a
  time; differentiable in hidden, table and weights (labels are integers)."""
  features = hidden.shape[-1]
  flat_hidden = hidden.reshape(-1, features)
  pad = -flat_hidden.shape[0] % chunk  # padded tokens weigh 0
  chunks = (
      jnp.pad(flat_hidden, ((0, pad), (0, 0))).reshape(-1, chunk, features),
      jnp.pad(labels.reshape(-1), (0, pad)).reshape(-1, chunk),
      jnp.pad(weights.reshape(-1).astype(jnp.float32), (0, pad)).reshape(-1, chunk))
  loss_sum, correct, count = _sums(jnp.dtype(dtype), *chunks, table)
  return {"loss_sum": loss_sum, "correct": correct, "count": count}


def _logits(hidden, table, dtype):  # [chunk, features], [vocab, features] -> [chunk, vocab]
  return jnp.einsum("ch,vh->cv", hidden.astype(dtype), table.astype(dtype),
                    preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sums(dtype, hidden, labels, weights, table):
  """(loss_sum, correct, count) over chunks: hidden [n, chunk, features],
  labels and weights [n, chunk]. Without differentiation: the logits only."""
  def add(total, chunk_arrays):
    h, y, w = chunk_arrays
    m = weighted_cross_entropy(_logits(h, table, dtype), y, w)
    return total + jnp.stack([m["loss_sum"], m["correct"], m["count"]]), None

  total, _ = jax.lax.scan(add, jnp.zeros((3,), jnp.float32), (hidden, labels, weights))
  return total[0], total[1], total[2]


def _sums_fwd(dtype, hidden, labels, weights, table):
  """The sums, and the gradients of loss_sum with respect to hidden, table and
  weights, chunk by chunk (the residuals the backward pass scales)."""
  def add(carry, chunk_arrays):
    total, d_table = carry
    h, y, w = chunk_arrays
    logits = _logits(h, table, dtype)  # [chunk, vocab] float32
    used = w > 0
    safe = jnp.where(used, y, 0)  # an ignored label may be out of range
    # One log-softmax and one argmax give the sums (as weighted_cross_entropy
    # takes them) and their derivatives in w: d loss_sum / d w and
    # d correct / d w per token (d count / d w = 1).
    log_p = jax.nn.log_softmax(logits)
    token_loss = jnp.where(used, -jnp.take_along_axis(log_p, safe[:, None], axis=-1)[:, 0],
                           0.0)
    token_hit = jnp.where(used, jnp.argmax(logits, axis=-1) == safe, False)
    sums = jnp.stack([jnp.sum(jnp.where(used, token_loss * w, 0.0)),
                      jnp.sum(jnp.where(used, token_hit * w, 0.0)), jnp.sum(w)])
    # d loss_sum / d logits = w * (softmax - one_hot(label)), 0 where ignored.
    d_logits = jnp.exp(log_p) - jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32)
    d_logits = jnp.where(used[:, None], d_logits * w[:, None], 0.0).astype(dtype)
    d_h = jnp.einsum("cv,vh->ch", d_logits, table.astype(dtype),
                     preferred_element_type=jnp.float32)
    d_table = d_table + jnp.einsum("cv,ch->vh", d_logits, h.astype(dtype),
                                   preferred_element_type=jnp.float32)
    return (total + sums, d_table), (d_h.astype(h.dtype), token_loss, token_hit)

  init = (jnp.zeros((3,), jnp.float32), jnp.zeros(table.shape, jnp.float32))
  (total, d_table), (d_hidden, token_loss, token_hit) = jax.lax.scan(
      add, init, (hidden, labels, weights))
  return (total[0], total[1], total[2]), (d_hidden, d_table.astype(table.dtype),
                                          token_loss, token_hit)


def _sums_bwd(dtype, residuals, cotangents):
  del dtype
  d_hidden, d_table, token_loss, token_hit = residuals
  g_loss, g_correct, g_count = cotangents
  # hidden and table reach only loss_sum (correct is an argmax, count the weights).
  d_weights = g_loss * token_loss + g_correct * token_hit + g_count
  return ((g_loss * d_hidden.astype(jnp.float32)).astype(d_hidden.dtype), None,
          d_weights, (g_loss * d_table.astype(jnp.float32)).astype(d_table.dtype))


_sums.defvjp(_sums_fwd, _sums_bwd)
