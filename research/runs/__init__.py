"""A run's folder and process: what every command that trains or reopens a run shares.

`run_files` (config.json and tokenizer/, written atomically and only when
changed; a damaged tokenizer rebuilt on resume when its fingerprint matches),
`checkpoint` (Orbax checkpoints, checksummed file by file and leaf by leaf,
pruned safely, restored with a fallback past damage), `saved_run` (`open_run`:
reopening a finished run read-only), `checksums` (the manifests and leaf
digests), `lock` (one trainer per workdir), `logger` (metrics.jsonl,
TensorBoard, progress lines, MFU, the profiler), `banner` (what a run says
before its first step), `warm_start` (a pretrained run's parameters into a new
model), `parallel` (devices, pmap sharding, several processes) and
`command_line` (the commands' flags and one-line errors).
"""
