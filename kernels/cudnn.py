"""cuDNN's fused attention through `jax.nn.dot_product_attention`, held to our contract.

The entry point's "cudnn" implementation: the peer the kernels are measured
against, for the arguments cuDNN takes; anything it would answer differently
from the reference is refused with a ValueError naming the way out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusedlm.kernels import masking, target, variants


def cudnn_attention(
    q, k, v, *, causal=False, scale=None, key_padding_mask=None,
    segment_ids=None, kv_segment_ids=None, bias=None,
    causal_alignment="bottom_right", local_window_size=None,
):
  """cuDNN's fused attention, for the arguments it can take.

  Differences from the other implementations, each refused with a
  ValueError rather than answered differently: no segment ids (JAX 0.11
  reaches cuDNN's packed layout only through private offsets, not a stable
  API); causal and the local window only where cuDNN's diagonal (top-left)
  is ours (q_len == kv_len, or causal_alignment="top_left"); bfloat16 or
  float16 only; head_dim a multiple of 8 up to 256. A row whose keys are
  all padded is not zeroed by cuDNN. The bias and the window are jax.nn's
  arguments (`kernels.variants` semantics).

  The key padding mask goes to cuDNN as a full [batch, 1, q_len, kv_len]
  mask: JAX 0.11's cuDNN path takes a mask (as a bias) only at full length
  ("Bias must have same seq length as QKV" for the broadcast [B, 1, 1, S]),
  or sequence lengths, which hold only for right padding, something the
  entry point cannot check under jit.
  """
  shape = masking.check_qkv(q, k, v)
  device = target.current_device()
  if not target.is_gpu(device):
    raise ValueError(
        "implementation='cudnn' needs an NVIDIA GPU; this is a"
        f" {target.describe(device)}."
    )
  if segment_ids is not None or kv_segment_ids is not None:
    raise ValueError(
        "implementation='cudnn' does not take segment_ids (packed sequences);"
        " use 'auto' or 'mosaic' (Hopper), or 'pallas'."
    )
  window = variants.check_window(local_window_size)
  if ((causal or window is not None)
      and variants.alignment_offset(shape, causal_alignment) != 0):
    raise ValueError(
        "implementation='cudnn' aligns the causal mask and the window"
        " top-left, which differs from bottom-right when q_len"
        f" ({shape.q_len}) != kv_len ({shape.kv_len}); use 'pallas' or 'xla'."
    )
  if window is not None:  # jax.nn takes no unbounded side
    window = tuple(shape.kv_len if w is None else w for w in window)
  bias = variants.check_broadcast("bias", bias, shape, boolean=False)[0]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"implementation='cudnn' takes bfloat16 or float16, got {q.dtype}."
    )
  if shape.head_dim % 8 or shape.head_dim > 256:
    raise ValueError(
        "implementation='cudnn' needs head_dim a multiple of 8 and at most"
        f" 256, got {shape.head_dim}."
    )
  mask = None
  if key_padding_mask is not None:
    masking.segments_from_masks(shape, key_padding_mask)  # validates
    mask = jnp.broadcast_to(key_padding_mask[:, None, None, :],
                            (shape.batch, 1, shape.q_len, shape.kv_len))
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask,
      scale=masking.default_scale(shape.head_dim, scale), is_causal=causal,
      local_window_size=window, implementation="cudnn",
  )
