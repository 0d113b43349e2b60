"""The FlashAttention kernel for TPUs in Pallas' Mosaic TPU backend.

`attention` (the differentiable `tpu_attention` and its design notes),
`forward`, `backward` (dQ with d bias, and dK/dV), `launch` (how the three
are launched: optional inputs, visible steps, compiler settings), `tiles`
(static settings, block ranges, masks, dropout) and `block_sizes` (the
tuning knob, its floors and VMEM). Compiled by Mosaic for TPUs, run by
Pallas' TPU interpreter elsewhere.
"""
