"""The attention entry point: one signature, several implementations.

`dot_product_attention` takes the layout of `jax.nn.dot_product_attention`
and the masks of `kernels.masking`, and dispatches to

  * "mosaic": the Hopper kernel of `kernels.mosaic.attention` (Pallas' Mosaic
    GPU backend: wgmma, TMA, warp specialisation; compute capability 9.x,
    run by Mosaic GPU's interpreter elsewhere with JAX >= 0.11). Calls of at
    most `kernels.mosaic.decode.MAX_Q_LEN` query rows (a decoding step
    against a key/value cache) take its XLA decoding path;
  * "pallas": the fused kernel of `kernels.triton.attention` (compiled through
    Triton on an NVIDIA GPU, run by Pallas' interpreter elsewhere);
  * "xla": the plain reference of `kernels.reference` (materialises scores);
  * "cudnn": cuDNN's fused attention through `jax.nn.dot_product_attention`
    (of the variants, the bias and the window);
  * "tpu": the TPU kernel of `kernels.tpu.attention` (Pallas' Mosaic TPU
    backend: MXU tiles, VMEM scratch, scalar-prefetched block skipping; run
    by Pallas' TPU interpreter off TPU); it takes every variant;
  * "auto": per call, the fastest implementation that takes the call's
    arguments on the device (`resolve_implementation`).

"auto" is resolved when a call is traced, from the call's static facts
(dtype, head dims, which variants it sets) and the device of
`kernels.target` (the default backend's first one, or a `target_device`):

  1. a GPU of compute capability 9.x (H100, H200), JAX >= 0.11, and a call
     the Mosaic kernel takes (`kernels.mosaic.coverage.refusal`: bfloat16
     or float16, head dims up to 256, every variant but the per-head boolean
     mask, a bias only up to head dim 128): "mosaic", the fastest there for
     plain attention (0.80x-1.18x cuDNN, 1.2x-1.8x the Triton kernel on an
     H200, BENCHMARKS.md; the variants are not yet measured on a GPU);
  2. any other NVIDIA GPU, or a call the Mosaic kernel lacks: "pallas";
  3. a TPU: "tpu", which takes every variant;
  4. every other backend: "xla".

"cudnn" is never picked: it refuses segment ids (packed sequences), which
training uses. Callers (the models) choose by config; tests hold every
implementation to the same reference.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from fusedlm.kernels import target, variants
from fusedlm.kernels.cudnn import cudnn_attention
from fusedlm.kernels.mosaic import coverage as mosaic_coverage
from fusedlm.kernels.mosaic import decode as mosaic_decode
from fusedlm.kernels.mosaic.attention import MIN_JAX as MOSAIC_MIN_JAX
from fusedlm.kernels.mosaic.attention import MosaicBlockSizes, mosaic_attention
from fusedlm.kernels.mosaic.attention import check_device as check_mosaic_device
from fusedlm.kernels.reference import reference_attention
from fusedlm.kernels.tpu.attention import TpuBlockSizes, compiles_for_tpu, tpu_attention
from fusedlm.kernels.triton.attention import BlockSizes, flash_attention

Implementation = Literal["auto", "pallas", "xla", "cudnn", "mosaic", "tpu"]
IMPLEMENTATIONS = ("auto", "pallas", "xla", "cudnn", "mosaic", "tpu")


@dataclasses.dataclass(frozen=True)
class Resolution:
  """What one attention call runs, and why."""

  implementation: str  # "mosaic", "pallas", "tpu", "xla" or "cudnn"
  reason: str  # a phrase: the rule that picked it, or why a faster one could not


def explain_implementation(
    implementation: str,
    q,  # [batch, q_len, num_heads, head_dim] (or unbatched), or its ShapeDtypeStruct
    k,
    v,
    *,
    block_sizes: BlockSizes | MosaicBlockSizes | None = None,
    device=None,
    **variant_args,
) -> Resolution:
  """The implementation a call with these arguments runs on `device`, and why.

  Only static facts are read (shapes, dtypes, which variants are set), so q,
  k and v may be jax.ShapeDtypeStructs. variant_args: the entry point's
  variant arguments as the call passes them (bias, mask, causal_alignment,
  local_window_size, logits_soft_cap, dropout_rate, dropout_rng,
  return_lse); block_sizes of one kernel pin "auto" to that kernel. device:
  default `kernels.target.current_device()`. An implementation other than
  "auto" is returned as requested (the entry point checks it).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"unknown attention implementation {implementation!r}; choose one of"
        f" {', '.join(IMPLEMENTATIONS)}.")
  q_len = q.shape[-3] if len(q.shape) >= 3 else 0
  if implementation != "auto":
    return _annotated(Resolution(implementation, "requested"), q_len)
  device = target.current_device() if device is None else device
  if getattr(device, "platform", None) == "tpu":
    return Resolution("tpu", "TPU backend: the TPU kernel takes every variant")
  if not target.is_gpu(device):
    return Resolution("xla", f"{getattr(device, 'platform', 'this')} backend: the"
                      " fused kernels compile for NVIDIA GPUs and TPUs")
  if isinstance(block_sizes, TpuBlockSizes):
    return Resolution("tpu", "the TPU kernel's TpuBlockSizes were given")
  if isinstance(block_sizes, BlockSizes):
    return Resolution("pallas", "the Triton kernel's BlockSizes were given")
  if not _jax_runs_mosaic():
    return Resolution("pallas", f"mosaic needs JAX >= 0.11, this is {jax.__version__}")
  if not target.is_hopper(device) and not isinstance(block_sizes, MosaicBlockSizes):
    capability = target.compute_capability(device) or "unknown"
    return Resolution("pallas", f"compute capability {capability}: mosaic needs 9.x")
  refusal = mosaic_coverage.refusal(
      dtype=q.dtype, head_dim=q.shape[-1], v_head_dim=v.shape[-1],
      variants=variants.given(**variant_args))
  if refusal is not None:
    return Resolution("pallas", refusal)
  return _annotated(Resolution("mosaic", "Hopper GPU, a call the kernel takes"), q_len)


def _jax_runs_mosaic() -> bool:
  return jax.__version_info__ >= MOSAIC_MIN_JAX


def _annotated(resolution: Resolution, q_len: int) -> Resolution:
  """Names mosaic's decoding path when the call takes it."""
  if resolution.implementation == "mosaic" and mosaic_decode.is_decoding(q_len):
    return dataclasses.replace(resolution, reason=(
        f"{resolution.reason}; q_len {q_len} <= {mosaic_decode.MAX_Q_LEN}:"
        " its XLA decoding path"))
  return resolution


def resolve_implementation(implementation: str, q, k, v, **kwargs) -> str:
  """The implementation name `explain_implementation` picks for the call."""
  return explain_implementation(implementation, q, k, v, **kwargs).implementation


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
    block_sizes: BlockSizes | MosaicBlockSizes | TpuBlockSizes | None = None,
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
    implementation: "auto" (resolved per call, see the module docstring),
      "mosaic", "pallas", "tpu", "xla" or "cudnn".
    block_sizes: tiles of the Pallas kernel, a `BlockSizes` ("pallas"), a
      `MosaicBlockSizes` ("mosaic") or a `TpuBlockSizes` ("tpu"); default:
      the kernel's table.
    interpret: run the Pallas kernel in the interpreter; default: on any
      backend but GPU ("pallas") or TPU ("tpu"). "mosaic" also takes Mosaic
      GPU's InterpretGPUParams.

  The semantics of every argument: `kernels.masking` and `kernels.variants`.
  """
  q, k, v, key_padding_mask, segment_ids, kv_segment_ids, bias, mask = (
      _as_array(name, x) for name, x in (
          ("q", q), ("k", k), ("v", v), ("key_padding_mask", key_padding_mask),
          ("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids),
          ("bias", bias), ("mask", mask)))
  variant_args = dict(
      bias=bias, mask=mask, causal_alignment=causal_alignment,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_lse=return_lse)
  implementation = resolve_implementation(
      implementation, q, k, v, block_sizes=block_sizes, **variant_args)
  if q.ndim == 3:
    return _unbatched(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, bias=bias,
        mask=mask, causal_alignment=causal_alignment,
        local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        return_lse=return_lse, implementation=implementation,
        block_sizes=block_sizes, interpret=interpret)
  if implementation == "xla":
    return reference_attention(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, **variant_args,
    )
  if implementation == "pallas":
    if interpret is None:
      interpret = not target.is_gpu(target.current_device())
    return flash_attention(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, **variant_args,
        block_sizes=block_sizes, interpret=interpret,
    )
  if implementation == "tpu":
    if interpret is None:
      interpret = not compiles_for_tpu()
    return tpu_attention(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, **variant_args,
        block_sizes=block_sizes, interpret=interpret,
    )
  masks = dict(causal=causal, scale=scale, key_padding_mask=key_padding_mask,
               segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  given = variants.given(**variant_args)
  if implementation == "mosaic":
    refusal = mosaic_coverage.refusal(
        dtype=q.dtype, head_dim=q.shape[-1], v_head_dim=v.shape[-1], variants=given)
    if refusal is not None:
      raise ValueError(f"implementation='mosaic' cannot run this call: {refusal};"
                       " use 'auto', 'pallas' or 'xla'.")
    if not interpret:
      check_mosaic_device()
    del variant_args["mask"]  # refused above unless None
    if mosaic_decode.is_decoding(q.shape[1]):
      return mosaic_decode.decode_attention(q, k, v, **masks, **variant_args)
    return mosaic_attention(q, k, v, **masks, **variant_args, block_sizes=block_sizes,
                            interpret=interpret or False)
  unwired = [name for name in given if name not in _CUDNN_TAKES]
  if unwired:
    raise ValueError(
        f"implementation={implementation!r} is not wired for"
        f" {', '.join(unwired)}; use 'pallas', 'tpu' or 'xla', which take every variant.")
  return cudnn_attention(q, k, v, **masks,
                         **{name: variant_args[name] for name in _CUDNN_TAKES})


# The variant arguments cuDNN takes, through jax.nn.dot_product_attention.
_CUDNN_TAKES = ("bias", "causal_alignment", "local_window_size")


def _as_array(name: str, x):
  """An array argument as a jax array: array-likes (numpy arrays, nested lists of
  numbers) are converted, as jax.nn's functions do; anything else is a
  TypeError naming the argument."""
  if x is None or isinstance(x, jax.Array):
    return x
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be an array or an array-like (a numpy array, a nested"
                    f" list of numbers), got {type(x).__name__}: {e}") from None


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

