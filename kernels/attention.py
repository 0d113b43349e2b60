"""The attention entry point: one signature, several implementations.

`dot_product_attention` takes the layout of `jax.nn.dot_product_attention`
and the masks of `kernels.masking`, and dispatches to

  * "pallas": the fused kernel of `kernels.triton.attention` (compiled through
    Triton on an NVIDIA GPU, run by Pallas' interpreter elsewhere);
  * "xla": the plain reference of `kernels.reference` (materialises scores);
  * "cudnn": cuDNN's fused attention through `jax.nn.dot_product_attention`;
  * "mosaic": the Hopper kernel of `kernels.mosaic.attention` (Pallas' Mosaic
    GPU backend: wgmma, TMA, warp specialisation; compute capability 9.x,
    run by Mosaic GPU's interpreter elsewhere with JAX >= 0.11);
  * "auto": "pallas" on GPU, "xla" on every other backend. It does not pick
    "mosaic" on Hopper until that kernel is measured faster there than the
    Triton one (BENCHMARKS.md).

Callers (the models) choose by config; tests hold every implementation to
the same reference.
"""

from __future__ import annotations

from typing import Literal

import jax

from fusedlm.kernels.cudnn import cudnn_attention
from fusedlm.kernels.mosaic.attention import MosaicBlockSizes, mosaic_attention
from fusedlm.kernels.reference import reference_attention
from fusedlm.kernels.triton.attention import BlockSizes, flash_attention

Implementation = Literal["auto", "pallas", "xla", "cudnn", "mosaic"]
IMPLEMENTATIONS = ("auto", "pallas", "xla", "cudnn", "mosaic")


def resolve_implementation(implementation: str) -> str:
  """Maps "auto" to the implementation for the default backend."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"unknown attention implementation {implementation!r}; choose one of"
        f" {', '.join(IMPLEMENTATIONS)}."
    )
  if implementation == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return implementation


def dot_product_attention(
    q,  # [batch, q_len, num_heads, head_dim] (or unbatched: no batch axis)
    k,  # [batch, kv_len, num_kv_heads, head_dim]
    v,  # [batch, kv_len, num_kv_heads, v_head_dim]
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask=None,  # [batch, kv_len] bool, True = attend
    segment_ids=None,  # [batch, q_len] int
    kv_segment_ids=None,  # [batch, kv_len] int; defaults to segment_ids
    bias=None,  # [batch|1, num_heads|1, q_len|1, kv_len|1] float
    mask=None,  # [batch|1, num_heads|1, q_len|1, kv_len|1] bool, True = attend
    causal_alignment: str = "bottom_right",
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    return_lse: bool = False,
    implementation: Implementation = "auto",
    block_sizes: BlockSizes | MosaicBlockSizes | None = None,
    interpret: bool | None = None,
):  # out [batch, q_len, num_heads, v_head_dim], q.dtype; with return_lse
    # also lse [batch, num_heads, q_len] float32
  """Softmax attention softmax(q k^T * scale + bias) v with optional masks.

  Args:
    q, k, v: queries, keys and values; num_heads must be a multiple of
      num_kv_heads (grouped-query / multi-query attention); v's head dim may
      differ from q's and k's. Rank 3 (no batch axis) is taken as a batch of
      one, as `jax.nn.dot_product_attention` does; the masks, bias and mask
      then lose their batch axis too.
    causal: hide keys after each query's diagonal position.
    scale: multiplier of the scores; default 1/sqrt(head_dim).
    key_padding_mask: False marks padded keys.
    segment_ids, kv_segment_ids: packed sequences; a query sees only keys of
      its own segment. kv_segment_ids is needed only when q_len != kv_len.
    bias: added to the scaled scores, differentiable (ALiBi, T5's relative
      position bias); a size-1 batch or head axis is shared, not copied.
    mask: False hides a key from a query, per batch and head (jax.nn's).
    causal_alignment: "bottom_right" (default; the last query sees every
      key, as decoding with a cache needs) or "top_left" (jax.nn's); it
      places the diagonal of causal and of the local window.
    local_window_size: jax.nn's: an int w (keys within w either side of the
      diagonal) or (left, right), None on a side for unbounded.
    logits_soft_cap: c * tanh(x / c) on the (biased) scores (Gemma 2).
    dropout_rate, dropout_rng: dropout on the attention probabilities, from
      counter-based bits of (dropout_rng, batch, head, row, column); the
      "pallas", "mosaic" and "xla" implementations draw the same bits. Pass
      dropout_rate=0 (or leave it) in evaluation and decoding.
    return_lse: also return the rows' log-sum-exp (natural log; -inf on a
      row that sees no key), differentiable, so that attention over chunks
      of keys can be combined exactly.
    implementation: "auto", "pallas", "xla", "cudnn" or "mosaic".
    block_sizes: tiles of the Pallas kernel, a `BlockSizes` ("pallas") or a
      `MosaicBlockSizes` ("mosaic"); default: the kernel's table.
    interpret: run the Pallas kernel in the interpreter; default: on any
      backend but GPU. "mosaic" also takes Mosaic GPU's InterpretGPUParams.

  The semantics of every argument: `kernels.masking` and `kernels.variants`.
  """
  implementation = resolve_implementation(implementation)
  if q.ndim == 3:
    return _unbatched(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, bias=bias,
        mask=mask, causal_alignment=causal_alignment,
        local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        return_lse=return_lse, implementation=implementation,
        block_sizes=block_sizes, interpret=interpret)
  variant_args = dict(
      bias=bias, mask=mask, causal_alignment=causal_alignment,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_lse=return_lse)
  if implementation == "xla":
    return reference_attention(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, **variant_args,
    )
  if implementation == "pallas":
    if interpret is None:
      interpret = jax.default_backend() != "gpu"
    return flash_attention(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, **variant_args,
        block_sizes=block_sizes, interpret=interpret,
    )
  if implementation == "mosaic":
    if mask is not None:
      raise ValueError(
          "implementation='mosaic' is not wired for mask (the per-head boolean"
          " mask); use 'pallas' or 'xla', which take every variant.")
    if interpret is None and jax.default_backend() != "gpu":
      raise ValueError(
          "implementation='mosaic' runs on Hopper GPUs; on the"
          f" {jax.default_backend()!r} backend use 'pallas' or 'xla' (Mosaic"
          " GPU's stock interpreter cannot run it yet: the tests patch it, see"
          " tests/kernels/mosaic/interpreter_shim.py).")
    del variant_args["mask"]
    return mosaic_attention(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, **variant_args,
        block_sizes=block_sizes, interpret=interpret or False,
    )
  given = [name for name, value in variant_args.items()
           if name not in _CUDNN_TAKES
           and (value is not None if _PLAIN[name] is None else value != _PLAIN[name])]
  if given:
    raise ValueError(
        f"implementation={implementation!r} is not wired for"
        f" {', '.join(given)}; use 'pallas' or 'xla', which take every variant.")
  return cudnn_attention(
      q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
      **{name: variant_args[name] for name in _CUDNN_TAKES},
  )


_CUDNN_TAKES = ("bias", "causal_alignment", "local_window_size")  # through jax.nn
_PLAIN = dict(bias=None, mask=None, causal_alignment="bottom_right",
              local_window_size=None, logits_soft_cap=None, dropout_rate=0.0,
              dropout_rng=None, return_lse=False)


def _unbatched(q, k, v, *, key_padding_mask, segment_ids, kv_segment_ids,
               bias, mask, return_lse, **kwargs):
  """Rank-3 inputs as a batch of one (jax.nn's unbatched form)."""
  if k.ndim != 3 or v.ndim != 3:
    raise ValueError(
        f"q has rank 3 (unbatched), so k and v must too; got k {k.shape}, v"
        f" {v.shape}.")
  def add_batch(x, name, rank):
    if x is None:
      return None
    if x.ndim != rank:
      raise ValueError(
          f"unbatched q: {name} must have rank {rank} (no batch axis), got"
          f" shape {x.shape}.")
    return x[None]
  result = dot_product_attention(
      q[None], k[None], v[None],
      key_padding_mask=add_batch(key_padding_mask, "key_padding_mask", 1),
      segment_ids=add_batch(segment_ids, "segment_ids", 1),
      kv_segment_ids=add_batch(kv_segment_ids, "kv_segment_ids", 1),
      bias=add_batch(bias, "bias", 3), mask=add_batch(mask, "mask", 3),
      return_lse=return_lse, **kwargs)
  if return_lse:
    return result[0][0], result[1][0]
  return result[0]

