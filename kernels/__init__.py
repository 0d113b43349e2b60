"""fusedlm attention kernels: the fused Pallas kernels (Triton; Mosaic GPU for Hopper; Mosaic TPU), their reference, one entry point."""

from fusedlm.kernels.attention import (
    IMPLEMENTATIONS,
    dot_product_attention,
    resolve_implementation,
)
from fusedlm.kernels.mosaic.attention import MosaicBlockSizes
from fusedlm.kernels.reference import reference_attention
from fusedlm.kernels.tpu.attention import TpuBlockSizes, tpu_attention
from fusedlm.kernels.triton.attention import flash_attention
from fusedlm.kernels.triton.block_sizes import BlockSizes
from fusedlm.kernels.triton.notice import TritonBackendNotice

__all__ = [
    "BlockSizes",
    "IMPLEMENTATIONS",
    "MosaicBlockSizes",
    "TpuBlockSizes",
    "TritonBackendNotice",
    "dot_product_attention",
    "flash_attention",
    "reference_attention",
    "resolve_implementation",
    "tpu_attention",
]
