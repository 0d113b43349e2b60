"""What `fusedlm inspect mosaic` compiles: our Mosaic GPU kernel (with its variants) or JAX's.

Each case is (fn, args): a function of jax.ShapeDtypeStructs that
`kernels.bench.mosaic_compile.inspect` traces and compiles for sm_90a.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The variants a case can switch on, with the setting each compiles: one
# representative value each (the kernels specialise on whether a variant is
# on, not on its value, except the window's sides).
VARIANTS = ("bias", "window", "softcap", "dropout", "lse")
WINDOW = 512  # keys either side (causal: left only)
SOFT_CAP = 30.0
DROPOUT_RATE = 0.1


def fusedlm_case(head_dim: int, seq_len: int, heads: int, passes: str,
                 dtype: str = "float16", *, causal: bool = False,
                 segments: bool = False, group: int = 1,
                 blocks: dict | None = None, variants: tuple[str, ...] = (),
                 v_head_dim: int | None = None, bias_dtype: str | None = None):
  """(fn, args) of our Mosaic kernel at [1, seq_len, heads, head_dim].

  passes "fwd" compiles the forward kernel, "bwd" the gradient w.r.t. q, k,
  v (and the bias): the forward kernel (with L), then dQ, then dK/dV. group:
  query heads per K/V head; segments: packed-sequence ids (every tile
  masked); variants: names from VARIANTS; v_head_dim: V's head dim (default
  head_dim); bias_dtype: the bias's (default dtype). blocks:
  MosaicBlockSizes fields.
  """
  # pylint: disable-next=import-outside-toplevel
  from fusedlm.kernels.mosaic.attention import MosaicBlockSizes, mosaic_attention_any_device
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}.")
  block_sizes = MosaicBlockSizes(**blocks) if blocks else None
  dt = jnp.dtype(dtype)
  dv = head_dim if v_head_dim is None else v_head_dim
  q = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), dt)
  k = jax.ShapeDtypeStruct((1, seq_len, heads // group, head_dim), dt)
  v = jax.ShapeDtypeStruct((1, seq_len, heads // group, dv), dt)
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  bias = jax.ShapeDtypeStruct((1, heads, seq_len, seq_len), jnp.dtype(bias_dtype or dtype))
  kwargs = dict(causal=causal, block_sizes=block_sizes, return_lse="lse" in variants)
  if "window" in variants:
    kwargs["local_window_size"] = (WINDOW, 0 if causal else WINDOW)
  if "softcap" in variants:
    kwargs["logits_soft_cap"] = SOFT_CAP
  if "dropout" in variants:
    kwargs.update(dropout_rate=DROPOUT_RATE, dropout_rng=jax.random.PRNGKey(0))

  def forward(q, k, v, ids, bias):
    return mosaic_attention_any_device(
        q, k, v, segment_ids=ids if segments else None,
        bias=bias if "bias" in variants else None, **kwargs)

  def backward(q, k, v, ids, bias):
    def loss(q, k, v, bias):
      result = forward(q, k, v, ids, bias)
      out, lse = result if "lse" in variants else (result, None)
      total = out.astype(jnp.float32).sum()
      return total if lse is None else total + lse.sum()
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

  return {"fwd": forward, "bwd": backward}[passes], (q, k, v, ids, bias)


def attention_mgpu_case(head_dim: int, seq_len: int, heads: int, passes: str,
                        dtype: str = "float16", blocks: dict | None = None):
  """(fn, args) of JAX's attention_mgpu at [1, seq_len, heads, head_dim]; passes fwd or bwd.

  bwd differentiates w.r.t. q, k, v: the forward kernel, then dQ, then dK/dV.
  ValueError when the CUDA runtime it asks for while tracing is missing.
  """
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.pallas.ops.gpu import attention_mgpu
  try:  # attention_mgpu asks for it while tracing (a causal-mask ptxas bug)
    attention_mgpu.cuda_versions.cuda_runtime_get_version()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "JAX's attention_mgpu needs the CUDA runtime library (libcudart) to trace;"
        ' pip install "nvidia-cuda-runtime>=13.0.48,<14"') from e
  settings = dict(block_q=64, block_kv=128, max_concurrent_steps=2, block_q_dkv=64,
                  block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
  settings.update(blocks or {})
  config = attention_mgpu.TuningConfig(**settings)
  x = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.dtype(dtype))

  def forward(q, k, v):
    return attention_mgpu.attention(q, k, v, config)

  def backward(q, k, v):
    loss = lambda *qkv: forward(*qkv).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return {"fwd": forward, "bwd": backward}[passes], (x, x, x)
