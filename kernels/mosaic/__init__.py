"""The Hopper (sm_90a) kernel in Pallas' Mosaic GPU backend: wgmma, TMA, warp specialisation.

`attention` (the differentiable `mosaic_attention`, its checks, padding and
design notes), `forward`, `backward_dq` (dQ and d bias), `backward_dkv`
(dK and dV), `logits` (one score tile's variants and masks: bias, soft-cap,
window, dropout), `bounds` (which tiles each kernel visits) and `tiles`
(block sizes, head dims, static settings, grid axis names, the launch and
layout helpers the kernels share); `coverage` (what the kernel takes: the
predicate "auto" asks) and `decode` (the path of decoding-sized calls, a
few query rows against a key/value cache).
"""
