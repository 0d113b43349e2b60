"""The portable FlashAttention-2 kernel in Pallas' Triton backend.

`attention` (the differentiable `flash_attention`), `tiles` (the kernel
bodies: forward, dK/dV, dQ, dbias, and their masks), `block_sizes` (the
tuning knob and what fits a GPU block) and `notice` (JAX's deprecation of
the backend, said once). Compiled through Triton on NVIDIA GPUs, run by
Pallas' interpreter elsewhere.
"""
