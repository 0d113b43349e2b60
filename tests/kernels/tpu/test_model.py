"""A tiny decoder with attention="tpu" trains like "xla"; its train step compiles for a TPU.

The model is the kernel's client (research/ uses kernels/, never the
reverse); the test lives here so that CI's second pass, which runs
tests/kernels with JAX 0.11.2 and libtpu, compiles the step for a TPU
topology.

  * On CPU, the pmapped train step (`research.training.steps`) of a 2-layer
    GPT with packed sequences runs a few SGD steps through Pallas' TPU
    interpreter and through the XLA reference from the same parameters: the
    losses and the final parameters agree to the kernel's float32
    tolerances (both passes: TPU interpret mode works on JAX 0.10.2 too).
  * With JAX >= 0.11 and libtpu, the same step, shard_map'd over the four
    chips of a v5e:2x2 topology (data parallel, gradients pmean'd as under
    pmap), compiles with the compiled kernels (`targeting_tpu`).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fusedlm.kernels.tpu.attention import targeting_tpu
from fusedlm.research import models, objectives
from fusedlm.research.models.config import tiny_gpt
from fusedlm.research.runs.parallel import AXIS, replicate, shard, unreplicate
from fusedlm.research.training import steps as steps_lib

STEPS = 3
DEVICES = 2
BATCH, SEQ = 4, 32


def _config(attention: str):
  return tiny_gpt(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4,
                  mlp_dim=128, max_len=SEQ, dtype="float32", attention=attention)


def _batch(seed: int) -> dict:
  """Packed rows: documents cut at random points, positions restart at each."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (BATCH, SEQ + 1))
  cuts = rng.random((BATCH, SEQ)) < 0.1
  segment_ids = np.cumsum(cuts, axis=1).astype(np.int32)
  starts = np.concatenate([np.ones((BATCH, 1), bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  index = np.arange(SEQ)[None].repeat(BATCH, 0)
  positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  loss_mask = np.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                              np.zeros((BATCH, 1), bool)], axis=1)
  return {"inputs": tokens[:, :-1].astype(np.int32),
          "targets": tokens[:, 1:].astype(np.int32),
          "segment_ids": segment_ids, "positions": positions.astype(np.int32),
          "loss_mask": loss_mask.astype(np.float32)}


def _train(attention: str, params):
  cfg = _config(attention)
  model = models.build_model(cfg)
  tx = optax.sgd(0.5)
  devices = jax.local_devices()[:DEVICES]
  p_train, _ = steps_lib.pmapped_steps(model, tx, objectives.get("causal"), devices)
  state = replicate(steps_lib.create(cfg, tx, seed=0, params=params), devices)
  losses = []
  for _ in range(STEPS):
    # One batch throughout: the loss must fall as the model memorises it.
    state, sums = p_train(state, shard(_batch(0), DEVICES))
    sums = unreplicate(sums)
    losses.append(float(sums["loss_sum"] / sums["count"]))
  return losses, unreplicate(state).params


def test_tiny_model_trains_the_same_with_the_tpu_kernel():
  if len(jax.local_devices()) < DEVICES:
    pytest.skip(f"needs {DEVICES} devices (tests/conftest.py fakes 8 CPU ones)")
  params = models.init_params(_config("xla"), jax.random.PRNGKey(0))
  tpu_losses, tpu_params = _train("tpu", params)
  xla_losses, xla_params = _train("xla", params)
  assert tpu_losses[-1] < tpu_losses[0], tpu_losses  # it does train
  # Per step: the kernel's float32 output tolerance, relative to the loss.
  np.testing.assert_allclose(tpu_losses, xla_losses, rtol=2e-5)
  # After three updates of lr 0.5: the gradients' tolerance (1e-4 of O(1)).
  flat = jax.tree_util.tree_leaves_with_path(tpu_params)
  for (path, a), b in zip(flat, jax.tree_util.tree_leaves(xla_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


needs_libtpu = pytest.mark.skipif(
    jax.__version_info__ < (0, 11) or importlib.util.find_spec("libtpu") is None,
    reason="compiling for a TPU topology needs JAX >= 0.11 and libtpu"
           " (CI's second pass)")


@needs_libtpu
def test_train_step_compiles_for_a_tpu_topology():
  from fusedlm.kernels.bench import tpu_compile  # pylint: disable=import-outside-toplevel
  devices = tpu_compile.topology_devices("v5e:2x2")
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  P = jax.sharding.PartitionSpec
  cfg = _config("tpu").replace(dtype="bfloat16", max_len=256)
  model = models.build_model(cfg)
  tx = optax.adamw(1e-3)
  step = steps_lib.make_train_step(model, tx, objectives.get("causal"), len(devices))
  # shard_map over the slice: the state replicated, the batch split, the
  # gradients pmean'd over AXIS inside the step, exactly as under pmap.
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)),
                          out_specs=(P(), P()), check_vma=False)
  replicated = jax.sharding.NamedSharding(mesh, P())
  split = jax.sharding.NamedSharding(mesh, P(AXIS))
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      steps_lib.abstract(cfg, tx, seed=0))
  batch = {name: jax.ShapeDtypeStruct((4 * len(devices), 256), dtype, sharding=split)
           for name, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                               ("segment_ids", jnp.int32), ("positions", jnp.int32),
                               ("loss_mask", jnp.float32))}
  with targeting_tpu():
    lowered = jax.jit(sharded, donate_argnums=(0,)).trace(state, batch).lower()
  hlo = lowered.as_text()
  assert "tpu_custom_call" in hlo, "the attention kernels are not in the step"
  compiled = lowered.compile()
  text = compiled.as_text()
  for kernel in ("fusedlm_tpu_fwd", "fusedlm_tpu_bwd_dq", "fusedlm_tpu_bwd_dkv"):
    assert kernel in text, kernel
  assert "all-reduce" in text  # the gradient mean across the four chips
  print("train step HBM:", compiled.memory_analysis())
