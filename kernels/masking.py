"""Argument checks and the mask semantics shared by every attention implementation.

All implementations (the Pallas kernel, the XLA reference, cuDNN) take the same
arguments, in the layout of `jax.nn.dot_product_attention`:

  q: [batch, q_len, num_heads, head_dim]
  k: [batch, kv_len, num_kv_heads, head_dim]
  v: [batch, kv_len, num_kv_heads, v_head_dim]  (v_head_dim may differ)

and three optional, composable masks. Query i may attend to key j iff all hold:

  * causal: j <= i + (kv_len - q_len). Causal masking is aligned bottom-right:
    the last query sees every key, as in FlashAttention-2 (>= 2.1) and as
    decoding with a key/value cache needs. For q_len == kv_len this is the usual
    lower triangle. `jax.nn.dot_product_attention(is_causal=True)` aligns
    top-left instead, so the two differ when q_len != kv_len.
  * key_padding_mask[b, j] is True (False marks a padded key).
  * q_segment_ids[b, i] == kv_segment_ids[b, j] (packed sequences).

A query row with no visible key returns zeros, and its gradients are zero.

Internally, the padding mask is folded into the key segment ids: a padded key
gets `PAD_SEGMENT`, an id no query carries. The caller's segment ids must
therefore not use that value (the most negative int32).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PAD_SEGMENT = int(np.iinfo(np.int32).min)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """Static sizes of one attention call, read off validated arguments."""

  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  v_head_dim: int

  @property
  def group_size(self) -> int:
    """Query heads that share one key/value head (1 for plain multi-head)."""
    return self.num_heads // self.num_kv_heads

  @property
  def causal_offset(self) -> int:
    """Shift of the causal diagonal: query i sees keys j <= i + offset."""
    return self.kv_len - self.q_len


def check_qkv(q, k, v) -> AttentionShape:
  """Validates q, k, v ranks, sizes and dtypes; returns their sizes."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(
          f"{name} must have rank 4 [batch, seq_len, heads, head_dim], got"
          f" shape {x.shape}."
      )
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(
        f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}."
    )
  if q.dtype not in SUPPORTED_DTYPES:
    raise ValueError(
        f"unsupported dtype {q.dtype}: attention takes float32, bfloat16 or"
        " float16."
    )
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(
        f"k and v must share [batch, kv_len, num_kv_heads]: k {k.shape}, v"
        f" {v.shape}.")
  batch, q_len, num_heads, head_dim = q.shape
  kv_batch, kv_len, num_kv_heads, kv_head_dim = k.shape
  if kv_batch != batch:
    raise ValueError(
        f"batch size mismatch: q has {batch}, k and v have {kv_batch}."
    )
  if kv_head_dim != head_dim:
    raise ValueError(
        f"head_dim mismatch: q has {head_dim}, k has {kv_head_dim}."
    )
  if min(q.shape) == 0 or min(k.shape) == 0 or min(v.shape) == 0:
    raise ValueError(f"empty input: q {q.shape}, k {k.shape}, v {v.shape}.")
  if num_heads % num_kv_heads:
    raise ValueError(
        f"num_heads ({num_heads}) must be a multiple of num_kv_heads"
        f" ({num_kv_heads}) for grouped-query attention."
    )
  return AttentionShape(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim,
                        v.shape[3])


def _check_ids(name: str, x, batch: int, length: int, what: str):
  if x.shape != (batch, length):
    raise ValueError(
        f"{name} must have shape [batch, {what}] = ({batch}, {length}), got"
        f" {x.shape}."
    )


def segments_from_masks(
    shape: AttentionShape,
    key_padding_mask=None,  # [batch, kv_len] bool, True = real key
    segment_ids=None,  # [batch, q_len] int
    kv_segment_ids=None,  # [batch, kv_len] int; defaults to segment_ids
):
  """Folds the padding mask and segment ids into one pair of id arrays.

  Returns None when no mask is given, else (q_segments [batch, q_len],
  kv_segments [batch, kv_len]), both int32, where query i may see key j iff
  q_segments[b, i] == kv_segments[b, j].
  """
  if segment_ids is None and kv_segment_ids is None and key_padding_mask is None:
    return None
  b, nq, nk = shape.batch, shape.q_len, shape.kv_len
  if kv_segment_ids is not None and segment_ids is None:
    raise ValueError("kv_segment_ids was given without segment_ids.")
  for name, x in (("segment_ids", segment_ids),
                  ("kv_segment_ids", kv_segment_ids)):
    if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers, got dtype {x.dtype}.")
  if segment_ids is not None:
    _check_ids("segment_ids", segment_ids, b, nq, "q_len")
    if kv_segment_ids is None:
      if nq != nk:
        raise ValueError(
            f"q_len ({nq}) != kv_len ({nk}): pass kv_segment_ids of shape"
            f" ({b}, {nk}) beside segment_ids."
        )
      kv_segment_ids = segment_ids
    _check_ids("kv_segment_ids", kv_segment_ids, b, nk, "kv_len")
    q_segments = segment_ids.astype(jnp.int32)
    kv_segments = kv_segment_ids.astype(jnp.int32)
  else:
    q_segments = jnp.zeros((b, nq), jnp.int32)
    kv_segments = jnp.zeros((b, nk), jnp.int32)
  if key_padding_mask is not None:
    _check_ids("key_padding_mask", key_padding_mask, b, nk, "kv_len")
    if key_padding_mask.dtype != jnp.bool_:
      raise ValueError(
          f"key_padding_mask must be bool (True = attend), got dtype"
          f" {key_padding_mask.dtype}."
      )
    kv_segments = jnp.where(key_padding_mask, kv_segments, PAD_SEGMENT)
  return q_segments, kv_segments


def dense_mask(shape: AttentionShape, causal: bool, segments, offset=None,
               window=None) -> jax.Array:
  """The full boolean mask [batch, 1, q_len, kv_len] (True = attend).

  offset: query i sits at key position i + offset (default: bottom-right,
  `causal_offset`); window: (left, right) keys either side of it (see
  `kernels.variants`). Only the reference materialises this; the kernel
  evaluates the same predicate block by block.
  """
  offset = shape.causal_offset if offset is None else offset
  rows = jnp.arange(shape.q_len)[:, None]
  cols = jnp.arange(shape.kv_len)[None, :]
  mask = jnp.ones((1, 1, shape.q_len, shape.kv_len), jnp.bool_)
  if causal:
    mask = mask & (cols <= rows + offset)[None, None]
  if window is not None:
    left, right = window
    if left is not None:
      mask = mask & (cols >= rows + offset - left)[None, None]
    if right is not None:
      mask = mask & (cols <= rows + offset + right)[None, None]
  if segments is not None:
    q_segments, kv_segments = segments
    mask = mask & (q_segments[:, None, :, None] == kv_segments[:, None, None, :])
  return mask


def segment_block_ranges(q_segments, kv_segments, block_q: int, block_k: int):
  """For each query block, the key blocks its segments can meet, and vice versa.

  q_segments [batch, q_pad], kv_segments [batch, kv_pad] (padded lengths,
  multiples of the blocks). Returns (kv_range [batch, q_pad // block_q, 2],
  q_range [batch, kv_pad // block_k, 2]) int32: [first, last + 1) of the
  blocks on the other side whose segment-id ranges [min, max] overlap this
  block's, [0, 0) when none does. A block outside that range shares no
  segment id with this one, so the kernels skip it through their loop bounds
  and load every block inside unconditionally (masking with `where`): a load
  under a branch is one Triton's software pipeliner leaves synchronous. For
  sorted ids (packed documents) the range is exactly the overlapping blocks;
  for unsorted ids it may hold some that are then fully masked.
  """
  b = q_segments.shape[0]
  q_blocks = q_segments.reshape(b, -1, block_q)
  kv_blocks = kv_segments.reshape(b, -1, block_k)
  q_min, q_max = q_blocks.min(-1), q_blocks.max(-1)
  kv_min, kv_max = kv_blocks.min(-1), kv_blocks.max(-1)
  # meet[b, i, j]: query block i and key block j may share an id.
  meet = ((q_min[:, :, None] <= kv_max[:, None, :])
          & (kv_min[:, None, :] <= q_max[:, :, None]))

  def first_and_end(meet):  # over the last axis
    n = meet.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    first = jnp.min(jnp.where(meet, index, n), axis=-1)
    end = jnp.max(jnp.where(meet, index + 1, 0), axis=-1)
    first = jnp.minimum(first, end)  # [0, 0) -> empty when nothing meets
    return jnp.stack([first, end], axis=-1).astype(jnp.int32)

  return first_and_end(meet), first_and_end(jnp.swapaxes(meet, 1, 2))


def default_scale(head_dim: int, scale: float | None) -> float:
  return 1.0 / float(np.sqrt(head_dim)) if scale is None else float(scale)
