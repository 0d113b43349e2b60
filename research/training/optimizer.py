"""The optimizer: AdamW, warm-up then decay, clipping, gradient accumulation.

Built from `config.optimizer` (see `experiments/`), fields:
  learning_rate     peak learning rate, reached at the end of warm-up
  schedule          "cosine" | "linear" | "constant" decay after warm-up
  warmup_steps      linear warm-up from 0
  min_lr_ratio      final learning rate as a fraction of the peak
  b1, b2, eps       Adam moments
  weight_decay      decoupled weight decay (Loshchilov & Hutter), applied to
                    weight matrices only: not to biases, LayerNorm scales or
                    embeddings, as is standard for Transformers
  grad_clip_norm    clip the global gradient norm to this (0 = off)
  accumulation_steps  gradients of this many steps are averaged per update

`steps` everywhere counts optimizer updates, so a run with accumulation k
takes k micro-batches per step of the schedule.
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warm-up to cfg.learning_rate, then the configured decay."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(
        f"unknown optimizer.schedule {cfg.schedule!r}; choose one of"
        f" {', '.join(SCHEDULES)}."
    )
  if not 0 <= cfg.warmup_steps <= total_steps:
    raise ValueError(
        f"optimizer.warmup_steps ({cfg.warmup_steps}) must lie in"
        f" [0, train.steps = {total_steps}]."
    )
  peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, floor, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if cfg.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params):
  """True for weight matrices ("kernel" leaves), False for biases, norms, embeddings."""
  def is_kernel(path, _):
    return getattr(path[-1], "key", None) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def build_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """The configured optimizer; its state is a pytree checkpointed with the params."""
  if cfg.accumulation_steps < 1:
    raise ValueError(
        f"optimizer.accumulation_steps must be >= 1, got {cfg.accumulation_steps}."
    )
  chain = []
  if cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(optax.adamw(
      learning_rate=learning_rate_schedule(cfg, total_steps),
      b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      weight_decay=cfg.weight_decay, mask=decay_mask,
  ))
  tx = optax.chain(*chain)
  if cfg.accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulation_steps)
  return tx
