"""The train state and the pure, pmapped train and eval steps.

  state = create(model_cfg, tx, seed)              # host, unreplicated
  p_train, p_eval = pmapped_steps(model, tx, objectives.get("causal"), devices)
  state, sums = p_train(replicated_state, sharded_batch)   # sums: psum'd metrics

Losses are normalised by the *global* token (and NSP example) count, so the
gradient after `pmean` is exactly that of the mean over the whole global batch,
however it is split over devices (a per-device mean would weight devices
with few masked tokens as much as those with many). That is what makes 1 and 8
devices agree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fusedlm.research import models, objectives
from fusedlm.research.runs.parallel import AXIS


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: micro-batches taken; also the data position
  params: Any  # float32 (cfg.param_dtype) parameter tree
  opt_state: Any  # optax state, float32 like the params
  rng: jax.Array  # uint32 [2] base dropout key; per step fold_in(rng, step)


def create(model_cfg, tx: optax.GradientTransformation, seed: int,
           params=None) -> TrainState:
  """A fresh state at step 0 (host side; replicate it for pmap), from freshly
  initialised parameters or from given ones (an imported model's)."""
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  if params is None:
    params = models.init_params(model_cfg, init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=dropout_rng)


def abstract(model_cfg, tx, seed: int) -> TrainState:
  """Shapes and dtypes of `create`'s result, allocating nothing (for restore)."""
  return jax.eval_shape(lambda: create(model_cfg, tx, seed))


def _global_mean_loss(sums: dict, n_devices: int):
  """n * local_sum / global_count: its pmean'd gradient is the global mean's."""
  count = jax.lax.psum(jax.lax.stop_gradient(sums["count"]), AXIS)
  loss = sums["loss_sum"] / jnp.maximum(count, 1e-8)
  if "nsp_loss_sum" in sums:
    nsp_count = jax.lax.psum(jax.lax.stop_gradient(sums["nsp_count"]), AXIS)
    loss = loss + sums["nsp_loss_sum"] / jnp.maximum(nsp_count, 1e-8)
  return n_devices * loss


def make_train_step(model, tx, objective: objectives.Objective, n_devices: int):
  """train_step(state, batch) -> (state, metric sums); run under pmap(AXIS).

  The sums also carry the global-norm diagnostics of the gradient (after the
  cross-device mean, before clipping), the new parameters and the update.

  model is the Encoder / Decoder module; its .cfg is what the loss reads
  (e.g. whether the encoder has an NSP head).
  """

  def train_step(state: TrainState, batch: dict):
    # Same key on resume (step is in the state); distinct per device.
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                             jax.lax.axis_index(AXIS))

    def loss_of(params):
      outputs = objective.outputs(model, {"params": params}, batch,
                                  deterministic=False, rngs={"dropout": rng})
      _, sums = objective.loss(outputs, batch, model.cfg)
      return _global_mean_loss(sums, n_devices), sums

    grads, sums = jax.grad(loss_of, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Diagnostics (metrics.summarize averages them over a log window). The
    # trees are identical on every device, so each adds 1/n and the psum
    # below gives one count per step.
    sums.update(steps=1.0 / n_devices, **{
        f"{name}_sum": optax.tree.norm(tree) / n_devices
        for name, tree in (("grad_norm", grads), ("param_norm", params),
                           ("update_norm", updates))})
    sums = jax.lax.psum(sums, AXIS)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, sums

  return train_step


def make_eval_step(model, objective: objectives.Objective):
  """eval_step(params, batch) -> metric sums over all devices; run under pmap(AXIS).

  The objective's eval_sums are added (classification: the confusion matrix).
  """

  def eval_step(params, batch: dict):
    outputs = objective.outputs(model, {"params": params}, batch)
    _, sums = objective.loss(outputs, batch, model.cfg)  # padded rows weigh 0
    if objective.eval_sums is not None:
      sums.update(objective.eval_sums(outputs, batch))
    return jax.lax.psum(sums, AXIS)
  return eval_step


def pmapped_eval_step(model, objective: objectives.Objective, devices):
  """The eval step alone, pmapped over `devices` (for evaluating a checkpoint)."""
  return jax.pmap(make_eval_step(model, objective), axis_name=AXIS, devices=devices)


def pmapped_steps(model, tx, objective: objectives.Objective, devices):
  """The train and eval steps pmapped over `devices` (state donated)."""
  p_train = jax.pmap(make_train_step(model, tx, objective, len(devices)), axis_name=AXIS,
                     devices=devices, donate_argnums=(0,))
  return p_train, pmapped_eval_step(model, objective, devices)
