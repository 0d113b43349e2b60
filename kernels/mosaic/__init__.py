"""The Hopper (sm_90a) kernel in Pallas' Mosaic GPU backend: wgmma, TMA, warp specialisation.

`attention` (the differentiable `mosaic_attention` and its design notes),
`forward`, `backward` (dQ and dK/dV) and `tiles` (block sizes, static
settings, masks and loop bounds the three kernels share); `coverage` (what
the kernel takes: the predicate "auto" asks) and `decode` (the path of
decoding-sized calls, a few query rows against a key/value cache).
"""
