"""Tools around the kernels, not kernels: the benchmark and the deviceless compilers.

`benchmark` (the `fusedlm bench-attention` command; `measure` times and
checks one cell, `report` writes its table, JSON and chart),
`triton_compile` and `mosaic_compile` (`fusedlm inspect triton|mosaic`:
compile the kernels for an H100 on any machine and report registers, spills,
shared memory and instructions), `tpu_compile` (`fusedlm inspect tpu`: the
TPU kernels for TPU topologies, with their VMEM need and the compiler's
warnings), and `command_line`, their flag conventions.
"""
