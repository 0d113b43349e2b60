"""A run's folder and process: what every command that trains or reopens a run shares.

`checkpoint` (the workdir's config.json, tokenizer and Orbax checkpoints;
`open_run` reopens a run), `checksums` (each checkpoint's manifest),
`lock` (one trainer per workdir), `logger` (metrics.jsonl, TensorBoard, the
progress line, MFU, the profiler), `warm_start` (a pretrained run's
parameters into a new model), `parallel` (devices, pmap sharding, several
processes) and `command_line` (the commands' flags and one-line errors).
"""
