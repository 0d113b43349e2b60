"""Test tooling for the variant grids (bias, mask, window, soft-cap, dropout, lse, ...).

Each kernel's variant test (tests/kernels/test_variants.py for the Triton
kernel, mosaic/ and tpu/ for the others) names its cases as (input shapes,
keyword arguments with placeholders); this module makes the inputs, fills
the placeholders, and holds a kernel's output and every gradient to the
float32 reference's, at the tolerances of `attention_cases`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fusedlm.kernels import reference_attention
from tests.kernels.attention_cases import TOLERANCE, assert_close, nan_rows


def segments(key, batch: int, length: int, rate: float):
  """Segment ids [batch, length] that start a new segment with probability `rate`."""
  cuts = jax.random.bernoulli(key, rate, (batch, length))
  return jnp.cumsum(cuts, axis=1).astype(jnp.int32)


def inputs(seed: int, *, batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int,
           head_dim: int, dtype, v_head_dim: int | None = None, bias_shape=None):
  """q, k, v, bias (or None), the output's cotangent (all `dtype`) and the
  lse's cotangent (float32)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  v_head_dim = head_dim if v_head_dim is None else v_head_dim
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, v_head_dim))
  bias = None if bias_shape is None else jax.random.normal(keys[3], bias_shape)
  d_out = jax.random.normal(keys[4], (batch, q_len, heads, v_head_dim))
  d_lse = jax.random.normal(keys[5], (batch, heads, q_len))
  cast = lambda x: None if x is None else x.astype(dtype)
  return cast(q), cast(k), cast(v), cast(bias), cast(d_out), d_lse


def resolve(kwargs: dict, q, k, seed: int, *, segment_rate: float) -> dict:
  """The case's keyword arguments with its placeholders replaced by arrays:
  segment_ids="q", kv_segment_ids="kv", key_padding_mask="padding" (the
  first row sees half its keys), mask="per_head", and a dropout_rng for a
  dropout_rate."""
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), 4)
  batch, q_len, heads = q.shape[:3]
  kv_len = k.shape[1]
  out = dict(kwargs)
  if out.get("segment_ids") == "q":
    out["segment_ids"] = segments(keys[0], batch, q_len, segment_rate)
  if out.get("kv_segment_ids") == "kv":
    out["kv_segment_ids"] = segments(keys[1], batch, kv_len, segment_rate)
  if out.get("key_padding_mask") == "padding":
    lengths = jnp.array([kv_len // 2, kv_len])[:batch]
    out["key_padding_mask"] = jnp.arange(kv_len)[None] < lengths[:, None]
  if out.get("mask") == "per_head":
    out["mask"] = jax.random.bernoulli(keys[2], 0.7, (batch, heads, q_len, kv_len))
  if "dropout_rate" in out:
    out["dropout_rng"] = jax.random.PRNGKey(seed + 7)
  return out


def value_and_grads(attention, q, k, v, bias, cotangent, **kwargs):
  """out (and lse), then (dq, dk, dv[, d bias]), all float32 numpy."""
  def f(q, k, v, bias):
    extra = {} if bias is None else {"bias": bias}
    return attention(q, k, v, **kwargs, **extra)
  out, vjp = jax.vjp(f, q, k, v, bias)
  grads = vjp(cotangent)
  to32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
  return jax.tree.map(to32, out), [to32(g) for g in grads if g is not None]


def cotangent_of(kwargs: dict, d_out, d_lse):
  return (d_out, d_lse) if kwargs.get("return_lse") else d_out


def assert_matches_reference(out, grads, q, k, v, bias, cotangent, **kwargs):
  """A kernel's `value_and_grads` against the float32 reference's on the same
  inputs: lse where finite (and infinite where the reference's is), the
  output, dq, dk, dv and d bias, at the inputs' dtype's tolerances."""
  up = lambda x: None if x is None else jax.tree.map(lambda y: y.astype(jnp.float32), x)
  ref_out, ref_grads = value_and_grads(
      reference_attention, up(q), up(k), up(v), up(bias), up(cotangent), **kwargs)
  out_tol, grad_tol = next(tol for dtype, tol in TOLERANCE.items()
                           if jnp.dtype(dtype) == q.dtype)
  if kwargs.get("return_lse"):
    (out, lse), (ref_out, ref_lse) = out, ref_out
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert_close(lse[finite], ref_lse[finite], out_tol, "lse")
  assert out.shape == ref_out.shape
  assert_close(out, ref_out, out_tol, "output")
  names = ["dq", "dk", "dv", "dbias"][:len(ref_grads)]
  assert len(grads) == len(ref_grads)
  for grad_name, grad, ref in zip(names, grads, ref_grads):
    assert grad.shape == ref.shape, grad_name
    assert_close(grad, ref, grad_tol, grad_name)


# Row i sees keys i-15..i. With 16-wide blocks, query rows 32..63 never need
# key block 0, and key block 1 (keys 16..31) is seen by no row past 46, so
# query block 3 (48..63) is skipped by dK/dV of key blocks 0, 1.
WINDOW = dict(causal=True, local_window_size=(15, 0))


def assert_window_skips_blocks(attention, q, k, v, d_out):
  """`attention` (16-wide tiles) on 64 tokens with WINDOW never visits a
  block outside the window: NaN there leaves the rows past it finite."""
  run = lambda q, k, v: value_and_grads(attention, q, k, v, None, d_out, **WINDOW)
  out, (dq, _, _) = run(q, nan_rows(k, 0, 16), nan_rows(v, 0, 16))
  assert np.all(np.isfinite(out[:, 32:])), "a key block left of the window was visited"
  assert np.all(np.isfinite(dq[:, 32:])), "dQ visited a key block left of the window"
  _, (_, dk, dv) = run(nan_rows(q, 48, 64), k, v)
  assert np.all(np.isfinite(dk[:, :32])), "dK visited a query block past the window"
  assert np.all(np.isfinite(dv[:, :32])), "dV visited a query block past the window"
