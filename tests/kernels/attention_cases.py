"""Shared inputs and tolerances for the attention tests.

Tolerances compare against the float32 reference run on float32 copies of
the inputs, as a fraction of max(1, the reference's largest magnitude):
  float32 (IEEE dots): 2e-5 for the output, 1e-4 for the gradients;
  float16: 4e-3 / 1e-2; bfloat16: 2e-2 / 5e-2 (8 mantissa bits; P and dS are
  rounded to the input dtype before their matrix products, as in every
  fused kernel).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fusedlm.kernels import reference_attention

TOLERANCE = {  # dtype -> (output, gradients)
    jnp.float32: (2e-5, 1e-4),
    jnp.float16: (4e-3, 1e-2),
    jnp.bfloat16: (2e-2, 5e-2),
}


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 2
  q_len: int = 16
  kv_len: int = 16
  heads: int = 2
  kv_heads: int = 2
  head_dim: int = 32
  causal: bool = False
  masks: str = "none"  # none | padding | segments | both
  dtype: type = jnp.float32

  @property
  def id(self) -> str:
    return (f"b{self.batch}_q{self.q_len}_k{self.kv_len}_h{self.heads}"
            f"x{self.kv_heads}_d{self.head_dim}_{'causal' if self.causal else 'full'}"
            f"_{self.masks}_{jnp.dtype(self.dtype).name}")


def make_inputs(case: Case, seed: int):
  """Fresh normal q, k, v, a cotangent, and the mask keyword arguments."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  b, nq, nk, d = case.batch, case.q_len, case.kv_len, case.head_dim
  q = jax.random.normal(keys[0], (b, nq, case.heads, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, nk, case.kv_heads, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, nk, case.kv_heads, d), jnp.float32)
  cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
  masks = {}
  if case.masks in ("padding", "both"):
    # Each row keeps a random-length prefix of at least one key.
    lengths = jax.random.randint(keys[4], (b,), 1, nk + 1)
    masks["key_padding_mask"] = jnp.arange(nk)[None, :] < lengths[:, None]
  if case.masks in ("segments", "both"):
    # Sorted ids, as packing produces: boundaries at random cut points.
    q_cuts = jax.random.bernoulli(keys[5], 0.15, (b, nq))
    segment_ids = jnp.cumsum(q_cuts, axis=1).astype(jnp.int32)
    masks["segment_ids"] = segment_ids
    if nq != nk:
      kv_cuts = jax.random.bernoulli(keys[4], 0.15, (b, nk))
      masks["kv_segment_ids"] = jnp.cumsum(kv_cuts, axis=1).astype(jnp.int32)
  cast = lambda x: x.astype(case.dtype)
  return cast(q), cast(k), cast(v), cast(cotangent), masks


def output_and_grads(attention, q, k, v, cotangent, **kwargs):
  """out, (dq, dk, dv) of <out, cotangent>, all float32."""
  def f(q, k, v):
    return attention(q, k, v, **kwargs)
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(cotangent)
  to32 = lambda x: np.asarray(x.astype(jnp.float32))
  return to32(out), tuple(to32(g) for g in grads)


def reference_output_and_grads(case: Case, q, k, v, cotangent, masks):
  up = lambda x: x.astype(jnp.float32)
  return output_and_grads(
      reference_attention, up(q), up(k), up(v), up(cotangent),
      causal=case.causal, **masks,
  )


def assert_close(actual, expected, tol: float, name: str):
  # Inputs are unit normals, so outputs and gradients are O(1); a gradient
  # that is zero in exact arithmetic (one key: dq = dk = 0) is held to 1.
  scale = max(float(np.max(np.abs(expected))), 1.0)
  assert np.all(np.isfinite(actual)), f"{name} has non-finite values"
  np.testing.assert_allclose(
      actual, expected, rtol=0, atol=tol * scale,
      err_msg=f"{name}: tolerance {tol} x max|ref| = {tol * scale:.3g}",
  )


def nan_rows(x, start: int, stop: int):
  """x [batch, rows, ...] with rows start..stop NaN. A tile that loads any of
  them is poisoned (0 * NaN is NaN), so finite results prove it was skipped."""
  return x.at[:, start:stop].set(jnp.nan)


def assert_other_segments_skipped(attention, case: Case):
  """`attention` (q, k, v, segment_ids=...; 16-wide tiles) over 64 tokens in two
  32-token segments never visits the other segment's blocks: in the output
  and dQ (keys of segment 1 NaN) nor in dK and dV (queries of segment 0 NaN)."""
  q, k, v, cotangent, _ = make_inputs(case, seed=13)
  segment_ids = jnp.where(jnp.arange(64) < 32, 0, 1)[None].astype(jnp.int32)
  run = lambda q, k, v: output_and_grads(attention, q, k, v, cotangent,
                                         segment_ids=segment_ids)
  out, (dq, _, _) = run(q, k, nan_rows(v, 32, 64))
  assert np.all(np.isfinite(out[:, :32])), "another segment's block was visited"
  assert np.all(np.isfinite(dq[:, :32]))
  _, (_, dk, dv) = run(nan_rows(q, 0, 32), k, v)
  assert np.all(np.isfinite(dk[:, 32:])) and np.all(np.isfinite(dv[:, 32:]))
