"""The attention variants a benchmark cell can run, and what each costs in FLOPs.

A cell's variant is one of VARIANTS: "none" (plain attention), "dropout"
(rate 0.1, BERT's and GPT-2's), "window" (a local window of WINDOW keys
left of the diagonal, and right of it too when not causal), "softcap"
(Gemma 2's logit soft-cap, 50) or "bias" (an additive [1, heads, N, N]
bias in the inputs' dtype, differentiated like q, k and v). Arrays a variant
needs (the bias) are arguments of the timed function, so that jit does not
fold them into the program as constants.
"""

from __future__ import annotations

import jax

VARIANTS = ("none", "dropout", "window", "softcap", "bias")
DROPOUT_RATE = 0.1
WINDOW = 1024
SOFT_CAP = 50.0


def check(variant: str) -> str:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}.")
  return variant


def static_kwargs(variant: str, causal: bool) -> dict:
  """The `dot_product_attention` keyword arguments a variant adds (no arrays
  of the problem's size)."""
  check(variant)
  if variant == "dropout":
    return dict(dropout_rate=DROPOUT_RATE, dropout_rng=jax.random.PRNGKey(17))
  if variant == "window":
    return dict(local_window_size=(WINDOW, 0 if causal else WINDOW))
  if variant == "softcap":
    return dict(logits_soft_cap=SOFT_CAP)
  return {}


def arrays(variant: str, shape, dtype, seed: int) -> dict:
  """Arrays a variant adds for q of `shape` [batch, N, heads, head_dim]."""
  if check(variant) != "bias":
    return {}
  _, n, heads, _ = shape
  return {"bias": jax.random.normal(jax.random.PRNGKey(seed + 101),
                                    (1, heads, n, n), dtype)}


def visible_pairs(variant: str, causal: bool, n: int) -> float:
  """(query, key) pairs a row block computes for N = n: n^2, halved causal
  (the benchmark's convention), and only the window's band with a window."""
  if check(variant) != "window" or WINDOW + 1 >= n:
    return n * n * (0.5 if causal else 1.0)
  w = WINDOW
  left = n * (w + 1) - w * (w + 1) / 2  # keys i - w .. i, clipped at 0
  return left if causal else 2 * left - n  # and i .. i + w, the diagonal once


def error_rows_ok(variant: str, rows: int, n: int) -> bool:
  """Whether the error against the reference can be taken on the last `rows`
  query rows alone: dropout's bits depend on a row's absolute position,
  which the reference of a tail of rows would renumber."""
  return variant != "dropout" or rows == n


def last_rows(extra: dict, rows: int) -> dict:
  """The variant's arrays for the reference of the last `rows` query rows."""
  return {name: x[:, :, -rows:] if name == "bias" else x
          for name, x in extra.items()}


def cast(extra: dict, dtype) -> dict:
  return {name: x.astype(dtype) for name, x in extra.items()}
