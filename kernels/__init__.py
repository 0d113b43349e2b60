"""fusedlm attention kernels: the fused Pallas kernels (Triton; Mosaic GPU for Hopper), their reference, one entry point."""

from kernels.attention import (
    IMPLEMENTATIONS,
    dot_product_attention,
    resolve_implementation,
)
from kernels.block_sizes import BlockSizes
from kernels.mosaic_attention import MosaicBlockSizes
from kernels.pallas_attention import flash_attention
from kernels.triton_notice import TritonBackendNotice
from kernels.reference import reference_attention

__all__ = [
    "BlockSizes",
    "IMPLEMENTATIONS",
    "MosaicBlockSizes",
    "TritonBackendNotice",
    "dot_product_attention",
    "flash_attention",
    "reference_attention",
    "resolve_implementation",
]
