"""What a training run says before its first step: one block a newcomer can check.

  fusedlm train: runs/tiny_gpt
    run        new, 300 steps (checkpoint every 300, eval every 100)
    model      decoder, 4 layers x 256 wide, 4 heads of 64; 3.42M parameters
               (float32 storage, bfloat16 compute)
    attention  auto: self-attention x4 -> xla (cpu backend: the fused kernels compile
               for NVIDIA GPUs and TPUs)
    devices    8 x cpu (1 process)
    batch      32 rows x 128 tokens = 4,096 tokens a step (4 rows a device)
    data       corpus builtin, bpe tokenizer, vocabulary 8,192
    objective  causal
    workdir    /home/me/runs/tiny_gpt

Printed on stderr with the progress lines, once the data is ready (a data
set that takes longer than a second to prepare is announced before); the
run's result goes to stdout.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import jax

from fusedlm.research.models import resolved_attention


def parameter_count(abstract_params) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(abstract_params))


def _count(n: int) -> str:
  if n >= 1e9:
    return f"{n / 1e9:.2f}B"
  if n >= 1e6:
    return f"{n / 1e6:.2f}M"
  if n >= 1e3:
    return f"{n / 1e3:.1f}k"
  return str(n)


def describe_attention(model_cfg, objective, batch) -> str:
  """What the train step's attention calls run here, per kind of call (as
  "auto" resolves per call): "auto: self-attention x12 -> mosaic (Hopper
  GPU, a call the kernel takes)"; "xla" alone when every call runs what the
  config names."""
  calls = resolved_attention.for_batch(model_cfg, objective, batch, training=True)
  groups = collections.Counter((call.kind, call.resolution) for call in calls)
  if all(r.implementation == model_cfg.attention for _, r in groups):
    return model_cfg.attention
  return f"{model_cfg.attention}: " + "; ".join(
      f"{kind} x{n} -> {r.implementation} ({r.reason})" for (kind, r), n in groups.items())


def describe_start(start: int, total: int, config) -> str:
  """The run line: new, resuming at a step, or already complete."""
  schedule = (f"checkpoint every {config.checkpoint.every}, eval every"
              f" {config.train.eval_every}")
  accumulation = config.optimizer.accumulation_steps
  steps = f"{total} steps" + (f" ({total // accumulation} updates of {accumulation}"
                              " micro-batches)" if accumulation > 1 else "")
  if start >= total:
    return f"already complete at step {start} of {total}: nothing to train"
  if start:
    return f"resuming at step {start} of {total} ({schedule})"
  return f"new, {steps} ({schedule})"


def format_banner(*, workdir, start: int, total: int, config, model_cfg, num_params: int,
                  attention: str, devices: Sequence, objective: str, tokenizer) -> str:
  """The banner's lines (see the module docstring); `attention` names what each
  attention of the model resolved to."""
  c = model_cfg
  n_devices = len(devices)
  kinds = sorted({d.device_kind for d in devices})
  rows, seq_len = config.train.batch_size, config.data.seq_len
  layers = (f"{c.num_layers} + {c.num_layers} layers" if c.kind == "encoder_decoder"
            else f"{c.num_layers} layers")
  heads = (f"{c.num_heads} heads of {c.head_dim}"
           + (f", {c.kv_heads} key/value heads" if c.kv_heads != c.num_heads else ""))
  lines = [
      ("run", describe_start(start, total, config)),
      ("model", f"{c.kind}, {layers} x {c.hidden_size} wide, {heads};"
                f" {_count(num_params)} parameters ({c.param_dtype} storage,"
                f" {c.dtype} compute)"),
      ("attention", attention),
      ("devices", f"{n_devices} x {', '.join(kinds)} ({jax.process_count()}"
                  f" process{'es' if jax.process_count() > 1 else ''})"),
      ("batch", f"{rows} rows x {seq_len} tokens = {rows * seq_len:,} tokens a step"
                f" ({rows // n_devices} row{'s' if rows // n_devices != 1 else ''} a device)"),
      ("data", _describe_data(config, tokenizer)),
      ("objective", objective),
      ("workdir", str(workdir)),
  ]
  width = max(len(key) for key, _ in lines) + 2
  return "\n".join(f"  {key:<{width}}{value}" for key, value in lines)


def _describe_data(config, tokenizer) -> str:
  d = config.data
  source = d.get("corpus") or d.get("task") or "?"
  return (f"{'task' if d.get('task') else 'corpus'} {source}, {tokenizer.kind} tokenizer,"
          f" vocabulary {tokenizer.vocab_size:,}")
