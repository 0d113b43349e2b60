"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus).

  sampling = Sampling(temperature=0.8, top_k=40, top_p=0.95)
  tokens = sample(logits, jax.random.key(0), sampling)  # [batch, vocab] -> [batch]

The filters run in Hugging Face's order (`generate` with do_sample=True):
divide by the temperature, keep the top_k largest logits, then keep the
nucleus, the smallest set of most probable tokens whose probability (after
the first two steps) reaches top_p; the rest get -inf and `jax.random.categorical`
draws from what is left. temperature == 0 is greedy decoding: the argmax, with
the key ignored.

`Sampling` is a frozen, hashable dataclass, so it is a static argument under
jit (jax.jit(sample, static_argnames="sampling")) and a cache key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a token is picked from next-token logits.

  Attributes:
    temperature: logits are divided by it before sampling; 0 = greedy (argmax).
    top_k: sample among the k most likely tokens only; 0 = no limit.
    top_p: sample from the nucleus holding this much probability; 1 = no limit.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not _is_real(self.temperature) or not math.isfinite(self.temperature):
      raise ValueError(
          f"Sampling.temperature must be a finite number, got {self.temperature!r}.")
    if self.temperature < 0:
      raise ValueError(f"Sampling.temperature must be >= 0 (0 = greedy), got"
                       f" {self.temperature}.")
    if not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, bool):
      raise ValueError(f"Sampling.top_k must be an int, got {self.top_k!r}.")
    if self.top_k < 0:
      raise ValueError(f"Sampling.top_k must be >= 0 (0 = off), got {self.top_k}.")
    if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
      raise ValueError(
          f"Sampling.top_p must be in (0, 1] (1 = off), got {self.top_p!r}.")
    # Plain Python numbers: one hash (one compiled program) for 1, 1.0 and
    # np.float32(1), and a JSON-serialisable record.
    object.__setattr__(self, "temperature", float(self.temperature))
    object.__setattr__(self, "top_k", int(self.top_k))
    object.__setattr__(self, "top_p", float(self.top_p))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def describe(self) -> str:
    """'greedy' or e.g. 'temperature 0.8, top_k 40, top_p 0.95' (the active parts)."""
    if self.greedy:
      return "greedy"
    parts = [f"temperature {self.temperature:g}"]
    if self.top_k:
      parts.append(f"top_k {self.top_k}")
    if self.top_p < 1.0:
      parts.append(f"top_p {self.top_p:g}")
    return ", ".join(parts)


def warp_logits(
    logits,  # [batch, vocab] float
    sampling: Sampling,
) -> jax.Array:  # [batch, vocab] float32; -inf where a token may not be drawn
  """Temperature, then top-k, then top-p: the logits `sample` draws from.

  Not for greedy settings (temperature 0), which never scale the logits. A tie
  at the top-k or top-p cut keeps every tied token (as Hugging Face's top-k).
  """
  if sampling.greedy:
    raise ValueError("warp_logits needs temperature > 0; temperature 0 is greedy.")
  logits = logits.astype(jnp.float32) / sampling.temperature
  vocab = logits.shape[-1]
  if 0 < sampling.top_k < vocab:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]  # [batch, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    ordered = -jnp.sort(-logits, axis=-1)  # descending; top-k's -inf go last
    probs = jax.nn.softmax(ordered, axis=-1)
    # Probability of the more likely tokens before each one: a token is in the
    # nucleus while that is still short of top_p, so the most likely token is
    # always kept and the one that reaches top_p is the last kept.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < sampling.top_p
    cut = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cut, -jnp.inf, logits)
  return logits


def sample(
    logits,  # [batch, vocab] float
    rng: jax.Array,  # a PRNG key; unused when greedy
    sampling: Sampling,
) -> jax.Array:  # [batch] int32
  """One token per row; pure, so jittable with `sampling` static."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, warp_logits(logits, sampling), axis=-1).astype(
      jnp.int32)
