"""What a training run says before its first step: one block a newcomer can check.

  fusedlm train: runs/tiny_gpt
    run        new, 300 steps (checkpoint every 300, eval every 100)
    model      decoder, 4 layers x 256 wide, 4 heads of 64; 3.42M parameters
               (float32 storage, bfloat16 compute)
    attention  auto -> xla
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

import math
from collections.abc import Sequence

import jax

from fusedlm.kernels import resolve_implementation


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


def describe_attention(model_cfg) -> str:
  """The model's attention implementation, and what "auto" resolves to here.

  "auto" resolves per call (`kernels.explain_implementation`); the banner
  shows its answer for a plain self-attention of the model's shapes at
  max_len. A call with a variant the fastest kernel lacks may differ
  (`research.models.resolved_attention` lists each layer's).
  """
  q = jax.ShapeDtypeStruct((1, model_cfg.max_len, model_cfg.num_heads, model_cfg.head_dim),
                           model_cfg.compute_dtype)
  kv = jax.ShapeDtypeStruct((1, model_cfg.max_len, model_cfg.kv_heads, model_cfg.head_dim),
                            model_cfg.compute_dtype)
  resolved = resolve_implementation(model_cfg.attention, q, kv, kv)
  return (model_cfg.attention if resolved == model_cfg.attention
          else f"{model_cfg.attention} -> {resolved}")


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
