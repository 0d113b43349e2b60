"""Training: the loop, its pure steps and the optimizer.

`loop` (`train`: resumable training of a run config, used by `fusedlm train`
and `fusedlm finetune`), `steps` (the TrainState and the pmapped train and
eval steps), `optimizer` (AdamW, schedules, clipping, accumulation),
`prefetch` (the next batches assembled and put on the devices while a step
runs), `eval_loop` (the evaluation pass over a split, and `evaluate_run` of a
saved run), `throughput` (`benchmark_training`: the train step per attention
implementation beside a plain Flax step, run or compiled for a compile-only
device, for `fusedlm bench-train`) and `host_costs` (the loop's host-side
work per step, timed).
"""
