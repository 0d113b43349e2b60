"""fusedlm attention kernels: the fused Pallas kernels (Triton; Mosaic GPU for Hopper; Mosaic TPU), their reference, one entry point.

attention.py is the entry point (`dot_product_attention`, and the "auto"
rule: `resolve_implementation` / `explain_implementation`); target.py the
device it resolves for (`target_device`); masking.py and variants.py the
semantics every implementation shares; reference.py the XLA reference;
cudnn.py cuDNN's route; triton/, mosaic/ and tpu/ the three kernels; tiling.py what
they share; bench/ the benchmark and the deviceless compile tools.
"""

from fusedlm.kernels.attention import (
    IMPLEMENTATIONS,
    Resolution,
    dot_product_attention,
    explain_implementation,
    resolve_implementation,
)
from fusedlm.kernels.mosaic.attention import MosaicBlockSizes
from fusedlm.kernels.reference import reference_attention
from fusedlm.kernels.target import target_device
from fusedlm.kernels.tpu.attention import TpuBlockSizes, tpu_attention
from fusedlm.kernels.triton.attention import flash_attention
from fusedlm.kernels.triton.block_sizes import BlockSizes
from fusedlm.kernels.triton.notice import TritonBackendNotice

__all__ = [
    "BlockSizes",
    "IMPLEMENTATIONS",
    "MosaicBlockSizes",
    "Resolution",
    "TpuBlockSizes",
    "TritonBackendNotice",
    "dot_product_attention",
    "explain_implementation",
    "flash_attention",
    "reference_attention",
    "resolve_implementation",
    "target_device",
    "tpu_attention",
]
