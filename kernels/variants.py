"""Attention variants beside the masks: bias, per-head mask, window, soft-cap, dropout.

Every implementation computes, for query i and key j of batch b, head h:

  x = scale * q.k + bias[b, h, i, j]                       (bias: optional)
  x = soft_cap * tanh(x / soft_cap)                        (soft_cap: optional)
  x = -inf where (i, j) is hidden: the masks of `kernels.masking`, the
      per-head `mask[b, h, i, j]` (False hides) and the local window
  P = softmax_j(x);  lse_i = log sum_j exp(x_ij)          (-inf on an empty row)
  out = (P * keep / (1 - dropout_rate)) v                  (dropout: optional)

The soft-cap is applied to the biased logits, so a bias bounds nothing the
cap does not; hide keys with `mask`, not with a -inf bias (a capped -inf is
-soft_cap, a finite logit).

Diagonal (`Variants.offset`): with causal_alignment="bottom_right" (the
default, as `kernels.masking` describes) query i sits at key position
i + kv_len - q_len; with "top_left" (as `jax.nn.dot_product_attention`) at i.
Causal hides keys after that position; the local window
(`local_window_size=(left, right)`, as jax.nn names it) shows keys from
position - left to position + right.

Dropout keeps P_ij where 32 random bits, word 0 of Philox-4x32-10 (Salmon et
al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) with counter
(j, i, h, b) and key (seed0, seed1), are >= dropout_rate * 2**32. The bits
are a pure function of (seed, batch, head, row, column): the kernel's
backward regenerates the mask instead of storing it, and the reference draws
the very same bits, so the two agree exactly. Only 32-bit integer operations
are used (the high half of a 32 x 32 product from 16-bit halves), so the
same code runs in a Triton kernel and in XLA without 64-bit types.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fusedlm.kernels.masking import AttentionShape

ALIGNMENTS = ("bottom_right", "top_left")
PHILOX_ROUNDS = 10
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Random123's multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # and key increments (Weyl sequence)


@dataclasses.dataclass(frozen=True)
class Variants:
  """The static choices of one attention call beyond causal and segments.

  The defaults are plain softmax attention; each field that differs
  specialises the kernels statically (the plain kernels are unchanged).
  """

  offset: int = 0  # query i sits at key position i + offset
  window: tuple[int | None, int | None] | None = None  # (left, right)
  soft_cap: float | None = None
  dropout_rate: float = 0.0
  bias: tuple[bool, bool] | None = None  # (per batch, per head) if given
  mask: tuple[bool, bool] | None = None  # (per batch, per head) if given
  return_lse: bool = False


# The entry point's variant arguments and their values in plain softmax
# attention: an implementation that lacks a variant takes a call that leaves
# it at this value.
PLAIN = dict(bias=None, mask=None, causal_alignment="bottom_right",
             local_window_size=None, logits_soft_cap=None, dropout_rate=0.0,
             dropout_rng=None, return_lse=False)


def given(**variant_args) -> list[str]:
  """The names of the variant arguments (PLAIN's) set to other than plain."""
  return [name for name, value in variant_args.items()
          if (value is not None if PLAIN[name] is None else value != PLAIN[name])]


def alignment_offset(shape: AttentionShape, causal_alignment: str) -> int:
  if causal_alignment not in ALIGNMENTS:
    raise ValueError(f"causal_alignment must be one of {', '.join(ALIGNMENTS)},"
                     f" got {causal_alignment!r}.")
  return shape.kv_len - shape.q_len if causal_alignment == "bottom_right" else 0


def check_window(local_window_size) -> tuple[int | None, int | None] | None:
  """jax.nn's local_window_size: None, an int (symmetric) or (left, right)."""
  if local_window_size is None:
    return None
  window = local_window_size
  if isinstance(window, int) and not isinstance(window, bool):
    window = (window, window)
  if (not isinstance(window, tuple) or len(window) != 2 or any(
      w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0)
      for w in window)):
    raise ValueError(
        "local_window_size must be an int >= 0 or a tuple (left, right) of ints"
        f" >= 0 (None: unbounded on that side), got {local_window_size!r}.")
  return None if window == (None, None) else window


def check_soft_cap(soft_cap) -> float | None:
  if soft_cap is None:
    return None
  if isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float)) or not (
      soft_cap > 0 and np.isfinite(soft_cap)):
    raise ValueError(f"logits_soft_cap must be a finite number > 0, got {soft_cap!r}.")
  return float(soft_cap)


def check_dropout(dropout_rate, dropout_rng) -> float:
  if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)) or not (
      0.0 <= dropout_rate < 1.0):
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key).")
  return float(dropout_rate)


def check_broadcast(name: str, x, shape: AttentionShape, *, boolean: bool):
  """Validates bias or mask [batch|1, heads|1, q_len|1, kv_len|1].

  Returns (array with the length axes broadcast to full size, (per batch,
  per head)); batch and head axes stay unbroadcast, so a bias shared by the
  batch is stored once.
  """
  if x is None:
    return None, None
  if x.ndim != 4:
    raise ValueError(
        f"{name} must have rank 4, broadcastable to [batch, num_heads, q_len,"
        f" kv_len] = {(shape.batch, shape.num_heads, shape.q_len, shape.kv_len)},"
        f" got shape {x.shape}.")
  full = (shape.batch, shape.num_heads, shape.q_len, shape.kv_len)
  for axis, (n, want) in enumerate(zip(x.shape, full)):
    if n not in (1, want):
      raise ValueError(
          f"{name} shape {x.shape} does not broadcast to [batch, num_heads,"
          f" q_len, kv_len] = {full} (axis {axis}).")
  if boolean and x.dtype != jnp.bool_:
    raise ValueError(f"{name} must be bool (True = attend), got dtype {x.dtype}.")
  if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float array, got dtype {x.dtype}.")
  x = jnp.broadcast_to(x, x.shape[:2] + full[2:])
  return x, (x.shape[0] > 1, x.shape[1] > 1)


def seed_words(dropout_rng) -> jax.Array:  # [2] uint32
  """The Philox key of a jax.random key (new-style typed or raw uint32)."""
  return jax.random.bits(dropout_rng, (2,), jnp.uint32)


def _mulhilo(a, m: int):
  """(high, low) 32-bit halves of the 64-bit product a * m, in uint32 only."""
  lo = a * jnp.uint32(m)
  a_lo, a_hi = a & jnp.uint32(0xFFFF), a >> jnp.uint32(16)
  m_lo, m_hi = jnp.uint32(m & 0xFFFF), jnp.uint32(m >> 16)
  t = a_lo * m_lo
  u = a_hi * m_lo + (t >> jnp.uint32(16))
  w = (u & jnp.uint32(0xFFFF)) + a_lo * m_hi
  hi = a_hi * m_hi + (u >> jnp.uint32(16)) + (w >> jnp.uint32(16))
  return hi, lo


class PhiloxWords:
  """The word arithmetic Philox needs beside xor, on uint32 jnp arrays.

  A kernel whose words are another type (Mosaic GPU's register arrays) or
  that has a hardware high multiply passes its own (the same bits).
  """

  mulhilo = staticmethod(_mulhilo)  # (high, low) halves of a * m

  @staticmethod
  def add(a, w: int):
    return a + jnp.uint32(w)


def philox4x32(counter, key, rounds: int = PHILOX_ROUNDS, words=PhiloxWords):
  """Philox-4x32 (Random123): 4 uint32 counter words, 2 key words -> 4 words."""
  c0, c1, c2, c3 = counter
  k0, k1 = key
  for _ in range(rounds):
    hi0, lo0 = words.mulhilo(c0, _PHILOX_M[0])
    hi1, lo1 = words.mulhilo(c2, _PHILOX_M[1])
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    k0 = words.add(k0, _PHILOX_W[0])
    k1 = words.add(k1, _PHILOX_W[1])
  return c0, c1, c2, c3


def dropout_counter(batch, head, rows, cols):
  """Philox's counter words (column, row, head, batch) of each pair, uint32,
  broadcast to the shape of rows and cols (query and key positions)."""
  u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)
  rows, cols = jnp.broadcast_arrays(u32(rows), u32(cols))
  zeros = jnp.zeros_like(rows)
  return cols, rows, zeros + u32(head), zeros + u32(batch)


def dropout_threshold(rate: float) -> int:
  """A pair is kept iff its 32 random bits (unsigned) are >= this."""
  return min(int(round(rate * 2.0**32)), 2**32 - 1)


def dropout_keep(seed, batch, head, rows, cols, rate: float):
  """True where a pair is kept (bool, broadcast shape); `dropout_scale`'s args."""
  u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)
  bits, _, _, _ = philox4x32(dropout_counter(batch, head, rows, cols),
                             (u32(seed[0]), u32(seed[1])))
  return bits >= jnp.uint32(dropout_threshold(rate))


def dropout_scale(seed, batch, head, rows, cols, rate: float):
  """1 / (1 - rate) where kept, 0 where dropped (float32, broadcast shape).

  seed: [2] uint32 (or its two words); batch, head: scalar ints; rows, cols:
  int arrays of query and key positions that broadcast against each other.
  """
  return jnp.where(dropout_keep(seed, batch, head, rows, cols, rate),
                   jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))
