"""Training throughput: the trainer's step per attention implementation, beside a plain step.

  result = benchmark_training(config, implementations=("mosaic", "pallas", "xla"))
  print(format_table(result))            # `fusedlm bench-train` does both, and writes JSON

Every row runs on one device the same model (config.model with the
tokenizer's vocabulary, as `fusedlm train` builds it) on the same batches
(the run's data pipeline: its corpus, tokenizer and packing; `batch(0)` and
`batch(1)` alternate), for `warmup_steps` untimed steps (the compile and
the first runs) and then `timed_steps` dispatched back to back with one
host sync at the end:

  * one row per attention implementation: the trainer's own pmapped step
    (research.training.steps: the objective's loss, the configured optimizer
    with its clipping and schedule, packed rows with their segment ids);
  * the reference row (marked "reference": true): the simplest Flax step
    on the same model and batches, jax.jit of the objective's loss and
    optax.adamw at the configured rate, without clipping, schedule,
    packing (segment ids and positions dropped) or chunked logits
    (ModelConfig.logits_chunk), with cuDNN's attention on
    a GPU when it takes the model (16-bit, no attention variants) and XLA's
    otherwise. It is nanoGPT's bench.py setting written in Flax: the bar.

Per row:
  ms_per_step        wall time of the timed steps / timed_steps
  tokens_per_second  batch_size * seq_len / step time
  mfu                tokens_per_second * flops_per_token / peak, as nanoGPT
                     counts it: flops_per_token = 6 N + 12 L H Dh T (N the
                     non-embedding parameters, research.runs.logger.
                     flops_per_token), peak the device's dense bf16 FLOP/s
                     (research.runs.logger.PEAK_FLOPS: 989e12 for an H100 or
                     H200); None where the peak is unknown (a CPU)
  memory_bytes       the compiled step's peak on the device: arguments +
                     outputs + temporaries - donated (XLA's memory_analysis)
  flops,             the compiled step's FLOPs and bytes accessed as XLA's
  bytes_accessed     cost_analysis counts them (a custom kernel's own work,
                     Pallas or cuDNN, is not counted: compare rows of one
                     implementation); None on a compile-only device, where
                     XLA gives no cost analysis
  vs_reference       tokens_per_second / the reference row's
  attention          what the step's attention calls resolved to
                     (research.models.resolved_attention)
  loss               of the last timed step (a finite number: the step ran)
  error              why the row did not run (mosaic off a Hopper GPU, a
                     model the implementation does not take), else None

With compile_only=True the steps are compiled for `device` and not run
(device may be a compile-only one: `fusedlm bench-train --compile_for=h100`
compiles for kernels.bench.mosaic_compile's H100 on a CPU machine, JAX >=
0.11 with the CUDA plugin and ptxas); rows then hold the compiled figures
(memory, FLOPs, bytes) and no timings.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import optax

from fusedlm.kernels import target
from fusedlm.research import models, objectives, run_config
from fusedlm.research.models import resolved_attention
from fusedlm.research.runs import logger as run_logging
from fusedlm.research.runs.parallel import replicate, shard, unreplicate
from fusedlm.research.training import host_costs, optimizer
from fusedlm.research.training import steps as steps_lib

DEFAULT_IMPLEMENTATIONS = ("mosaic", "pallas", "xla")
PACKING_FIELDS = ("segment_ids", "positions")  # what the reference step drops
MFU_FORMULA = ("tokens/s * (6 N + 12 L H Dh T) / peak; N = non-embedding parameters,"
               " peak = the device's dense bf16 FLOP/s")


@dataclasses.dataclass
class Row:
  implementation: str  # the attention implementation, or "reference (cudnn)" etc.
  reference: bool = False
  ms_per_step: float | None = None
  tokens_per_second: float | None = None
  mfu: float | None = None
  memory_bytes: int | None = None
  flops: float | None = None
  bytes_accessed: float | None = None
  vs_reference: float | None = None
  attention: list[str] = dataclasses.field(default_factory=list)
  loss: float | None = None
  error: str | None = None


def benchmark_training(config, *, implementations=DEFAULT_IMPLEMENTATIONS,
                       warmup_steps: int = 3, timed_steps: int = 10, device=None,
                       compile_only: bool = False, host_steps: int = 0,
                       drop_fields: tuple[str, ...] = ()) -> dict:
  """Times the trainer's step per implementation and the reference step.

  config: a pretraining run config (its train.batch_size and data.seq_len
  are the benchmark's). device: default the first local one. Returns the
  JSON record: the setting, "rows" (the reference row first), each a `Row`
  as a dict, and with host_steps > 0 "host": the trainer's host-side work
  per step over that many steps (research.training.host_costs).
  drop_fields: batch fields removed before any step sees them, to measure
  what one saves (mlm_positions: the MLM head over every position instead of
  the masked ones).
  """
  if warmup_steps < 1 or timed_steps < 1:
    raise ValueError(f"warmup_steps ({warmup_steps}) and timed_steps ({timed_steps})"
                     " must be >= 1: the first step compiles.")
  run_config.validate(config)
  objective = objectives.get(config.objective)
  if objective.fine_tunes:
    raise ValueError(f"bench-train times pretraining configs; a {objective.name} config"
                     " fine-tunes a pretrained run.")
  device = jax.local_devices()[0] if device is None else device
  data = objective.train_data(config, None)
  base = run_config.build_model_config(config, data.tokenizer.vocab_size)
  batches = [data.train.batch(step) for step in range(2)]
  missing = [name for name in drop_fields if name not in batches[0]]
  if missing:
    raise ValueError(f"cannot drop {missing}: the {objective.name} batches hold"
                     f" {', '.join(sorted(batches[0]))}.")
  batches = [{k: v for k, v in batch.items() if k not in drop_fields} for batch in batches]
  seq_len = config.data.seq_len
  tokens_per_step = config.train.batch_size * seq_len
  flops_per_token = run_logging.flops_per_token(base, models.abstract_params(base), seq_len)
  peak = run_logging.peak_flops(device)

  timing = None if compile_only else (warmup_steps, timed_steps)
  # Traced for `device`: "auto" and the kernels' device checks read it
  # (kernels.target), which matters when it is a compile-only one.
  with target.target_device(device):
    rows = [_reference_row(config, base, objective, batches, device, timing)]
    for implementation in implementations:
      rows.append(_trainer_row(config, base, implementation, objective, batches, device,
                               timing))
  for row in rows:
    if row.ms_per_step is not None:
      row.tokens_per_second = tokens_per_step / (row.ms_per_step / 1e3)
      if peak:
        row.mfu = row.tokens_per_second * flops_per_token / peak
  reference = rows[0].tokens_per_second
  for row in rows:
    if row.tokens_per_second is not None and reference:
      row.vs_reference = row.tokens_per_second / reference
  host = None
  if host_steps and not compile_only:
    host = host_costs.host_costs(data.train.batch, [device], range(host_steps))
  return {
      "device": target.describe(device), "jax": jax.__version__,
      "objective": objective.name, "corpus": data.corpus_name,
      "model": {k: v for k, v in base.to_dict().items() if k != "attention"},
      "parameters": models.count_params(base),
      "batch_size": config.train.batch_size, "seq_len": seq_len,
      "tokens_per_step": tokens_per_step,
      "warmup_steps": 0 if compile_only else warmup_steps,
      "timed_steps": 0 if compile_only else timed_steps, "compile_only": compile_only,
      "dropped_fields": list(drop_fields),
      "flops_per_token": flops_per_token,
      "peak_flops": peak, "mfu_formula": MFU_FORMULA,
      "rows": [dataclasses.asdict(row) for row in rows], "host": host,
  }


def _timed(compiled, state, batches, warmup_steps: int, timed_steps: int):
  """(seconds per step, the last step's outputs) of `compiled(state, batch)`."""
  out = None
  for step in range(warmup_steps):
    state, out = compiled(state, batches[step % len(batches)])
  jax.block_until_ready((state, out))
  start = time.perf_counter()
  for step in range(timed_steps):
    state, out = compiled(state, batches[step % len(batches)])
  jax.block_until_ready((state, out))
  return (time.perf_counter() - start) / timed_steps, out


def _compiled_figures(row: Row, compiled) -> None:
  """The compiled step's peak memory, FLOPs and bytes accessed, where XLA says."""
  stats = compiled.memory_analysis()
  if stats is not None:
    row.memory_bytes = int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if isinstance(cost, dict):
    row.flops = cost.get("flops")
    row.bytes_accessed = cost.get("bytes accessed")


def _abstract(tree, sharding=None):
  """Shapes and dtypes of `tree` (arrays or ShapeDtypeStructs), placed by `sharding`."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _failed(row: Row, error: Exception) -> Row:
  text = " ".join(str(error).split())
  row.error = f"{type(error).__name__}: {text[:300]}"
  return row


def _trainer_row(config, base, implementation, objective, batches, device,
                 timing) -> Row:
  """The trainer's pmapped step (one device) with `implementation`; timed
  unless `timing` is None ((warmup_steps, timed_steps) otherwise)."""
  row = Row(implementation)
  # Any failure of one implementation (refused off its GPU, out of memory)
  # is the row's result; the others still run.
  try:
    model_cfg = base.replace(attention=implementation)
    row.attention = resolved_attention.describe(
        resolved_attention.for_batch(model_cfg, objective, batches[0], training=True),
        model_cfg, device)[1:]
    tx = optimizer.build_optimizer(config.optimizer, config.train.steps)
    p_train, _ = steps_lib.pmapped_steps(models.build_model(model_cfg), tx, objective,
                                         [device])
    per_device = [shard(batch, 1) for batch in batches]  # [1, batch, ...]
    if timing is None:  # shapes only: nothing is allocated on `device`
      state = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype),
          steps_lib.abstract(model_cfg, tx, config.train.seed))
      _compiled_figures(row, p_train.lower(state, _abstract(per_device[0])).compile())
      return row
    state = replicate(steps_lib.create(model_cfg, tx, config.train.seed), [device])
    compiled = p_train.lower(state, per_device[0]).compile()
    _compiled_figures(row, compiled)
    # On the device before the clock starts, laid out as the step takes them.
    shardings = compiled.input_shardings[0][1]
    placed = [jax.device_put(batch, shardings) for batch in per_device]
    seconds, sums = _timed(compiled, state, placed, *timing)
  except Exception as e:  # pylint: disable=broad-except
    return _failed(row, e)
  sums = unreplicate(sums)
  row.ms_per_step = seconds * 1e3
  row.loss = float(sums["loss_sum"] / max(float(sums["count"]), 1e-8))
  return row


def reference_attention(model_cfg, device) -> str:
  """cuDNN on a GPU when it takes the model, else XLA."""
  takes = (model_cfg.dtype in ("bfloat16", "float16") and model_cfg.head_dim % 8 == 0
           and model_cfg.head_dim <= 256 and model_cfg.position != "relative"
           and not (model_cfg.attention_dropout or model_cfg.sliding_window
                    or model_cfg.attention_soft_cap))
  return "cudnn" if target.is_gpu(device) and takes else "xla"


def reference_step(model, objective, tx):
  """The simplest Flax train step: (params, opt_state), batch -> (new, loss)."""
  def step(state, batch):
    params, opt_state = state
    def loss_of(params):
      outputs = objective.outputs(model, {"params": params}, batch,
                                  deterministic=False, rngs={"dropout": jax.random.key(0)})
      return objective.loss(outputs, batch, model.cfg)[0]
    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss
  return jax.jit(step, donate_argnums=(0,))


def _reference_row(config, base, objective, batches, device, timing) -> Row:
  attention = reference_attention(base, device)
  # A plain step as a JAX user writes it: the logits whole, not chunked.
  model_cfg = base.replace(attention=attention, logits_chunk=0)
  row = Row(f"reference ({attention})", reference=True)
  o = config.optimizer
  tx = optax.adamw(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
                   weight_decay=o.weight_decay)
  try:
    unpacked = [{k: v for k, v in batch.items() if k not in PACKING_FIELDS}
                for batch in batches]
    row.attention = resolved_attention.describe(
        resolved_attention.for_batch(model_cfg, objective, unpacked[0], training=True),
        model_cfg, device)[1:]
    step = reference_step(models.build_model(model_cfg), objective, tx)
    if timing is None:  # shapes only
      on_device = jax.sharding.SingleDeviceSharding(device)
      params = models.abstract_params(model_cfg)
      state = _abstract((params, jax.eval_shape(tx.init, params)), on_device)
      _compiled_figures(row, step.lower(state, _abstract(unpacked[0], on_device)).compile())
      return row
    params = models.init_params(model_cfg, jax.random.PRNGKey(config.train.seed))
    state = jax.device_put((params, tx.init(params)), device)
    unpacked = [jax.device_put(batch, device) for batch in unpacked]
    compiled = step.lower(state, unpacked[0]).compile()
    _compiled_figures(row, compiled)
    seconds, loss = _timed(compiled, state, unpacked, *timing)
  except Exception as e:  # pylint: disable=broad-except
    return _failed(row, e)
  row.ms_per_step = seconds * 1e3
  row.loss = float(loss)
  return row


def format_table(result: dict) -> str:
  """The rows as a text table, with the setting and the MFU formula."""
  lines = [
      f"training throughput on {result['device']}, jax {result['jax']}:"
      f" {result['objective']} model of {result['parameters'] / 1e6:.1f}M parameters,"
      f" batch {result['batch_size']} x {result['seq_len']} tokens,"
      + (" compiled, not run" if result.get("compile_only") else
         f" {result['warmup_steps']} warm-up + {result['timed_steps']} timed steps"),
      f"MFU = {result['mfu_formula']}"
      + (f" = {result['peak_flops'] / 1e12:.0f} TFLOP/s" if result["peak_flops"] else
         " (unknown here: no MFU)"),
      f"{'implementation':<20} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6}"
      f" {'memory GiB':>10} {'TFLOP':>7} {'vs ref':>7}  attention / error"]

  def number(value, width: int, fmt: str, scale: float = 1.0) -> str:
    return f"{'-' if value is None else format(value * scale, fmt):>{width}}"
  for row in result["rows"]:
    name = row["implementation"] + (" *" if row["reference"] else "")
    note = row["error"] or "; ".join(line.strip() for line in row["attention"])
    ratio = "-" if row["vs_reference"] is None else f"{row['vs_reference']:.2f}x"
    lines.append(
        f"{name:<20} {number(row['ms_per_step'], 9, '.2f')}"
        f" {number(row['tokens_per_second'], 11, ',.0f')} {number(row['mfu'], 6, '.1%')}"
        f" {number(row['memory_bytes'], 10, '.2f', 2.0**-30)}"
        f" {number(row['flops'], 7, '.2f', 1e-12)} {ratio:>7}  {note}")
  lines.append("* the reference step: plain Flax, jit, AdamW without clipping,"
               " no packing")
  host = result.get("host")
  if host:
    parts = ", ".join(f"{part} {host[part]['median_ms']:.2f}" for part in host_costs.PARTS)
    lines.append(f"host work per step (median of {host['steps']}, ms): {parts};"
                 f" total {host['total_median_ms']:.2f}, on the prefetch thread and one"
                 " step late, hidden while below ms/step")
  return "\n".join(lines)
