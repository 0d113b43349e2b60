"""Training: the loop, its pure steps and the optimizer.

`loop` (`train`: resumable training of a run config, used by `fusedlm train`
and `fusedlm finetune`), `steps` (the TrainState and the pmapped train and
eval steps), `optimizer` (AdamW, schedules, clipping, accumulation) and
`eval_loop` (the evaluation pass over a split, and `evaluate_run` of a saved
run) and `throughput` (`benchmark_training`: the train step per attention
implementation beside a plain Flax step, for `fusedlm bench-train`).
"""
