"""implementation="mosaic" for a few query rows against many keys: cached decoding.

The kernel's forward gives each CTA 2 x 64 query rows of one head (a
warpgroup's wgmma has M = 64). One decoding step (q_len 1 against a cache of
hundreds of slots) would pad 127 of those 128 rows and launch one CTA per
(batch, head) that streams the whole cache alone: a dozen CTAs on 132 SMs
for batch 1 of GPT-2. Attention of a handful of rows is a matrix-vector
product bound by reading K and V once, which XLA spreads over the whole GPU
(two batched products and a softmax between them); calls with
q_len <= MAX_Q_LEN take that path. Its semantics are the reference's, which
every implementation is held to, values and gradients alike.
"""

from __future__ import annotations

from fusedlm.kernels.reference import reference_attention

# Rows up to which a call is decoding-sized: an eighth of the forward CTA's
# 128, where the padded tile would be more than 7/8 waste.
MAX_Q_LEN = 16


def is_decoding(q_len: int) -> bool:
  return q_len <= MAX_Q_LEN


def decode_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None,
                     segment_ids=None, kv_segment_ids=None, **variant_args):
  """Attention of q [batch, q_len <= MAX_Q_LEN, heads, d] over k, v, in XLA.

  variant_args: the entry point's (`kernels.variants`), which the reference
  takes, dropout's bits included.
  """
  return reference_attention(
      q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, **variant_args)
