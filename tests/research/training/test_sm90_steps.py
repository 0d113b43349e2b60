"""Every step that runs a model compiles for the H100 (sm_90a) with attention="mosaic", on CPU.

Issue 24: `fusedlm train --config.model.attention=mosaic` crashed at the
first step on the GPU ("NVSHMEM is not supported in XLA": the kernel under
jax.pmap). With JAX >= 0.11, its CUDA plugin and ptxas (CI's second pass),
XLA compiles for a compile-only H100 (`kernels.bench.mosaic_compile`), so
the whole pmapped train step of each kind of run is compiled here the way
the trainer builds it (research.training.steps), with the run's own batch
shapes (the runlocal smoke configs' data pipelines), and so are the
evaluation step and `fusedlm generate`'s jitted program (prefill + cached
decoding steps). Each program must hold the Mosaic kernels (custom calls
"mosaic_gpu_v2") and compile. Most of the time goes to ptxas, per distinct
kernel (forward, dQ, dK/dV for each combination of causal, masks and
lengths), not to the model's size: the models are the smoke configs'.

Elsewhere (JAX 0.10.2, no plugin, no ptxas) the tests skip with the reason.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm import kernels
from fusedlm.kernels.bench import mosaic_compile
from fusedlm.research import models, objectives, run_config
from fusedlm.research.inference import generation
from fusedlm.research.inference.sampling import Sampling
from fusedlm.research.training import optimizer
from fusedlm.research.training import steps as steps_lib
from tests.research.conftest import load_experiment

MOSAIC_CALL = "mosaic_gpu_v2"


@pytest.fixture(scope="module")
def h100():
  try:
    return mosaic_compile.h100_device()
  except mosaic_compile.InspectError as e:
    pytest.skip(f"cannot compile for the H100 here: {e}")


def _run(name: str, cache_dir, **model):
  """(model_cfg, objective, a training batch, an eval batch) of the runlocal
  config of experiments/<name>.py, in bfloat16 with attention="mosaic"."""
  config = load_experiment(name, run_config.RUNLOCAL)
  config.data.cache_dir = str(cache_dir)
  config.model.update(dtype="bfloat16", attention="mosaic", **model)
  objective = objectives.get(config.objective)
  data = objective.train_data(config, None)
  model_cfg = run_config.build_model_config(config, data.tokenizer.vocab_size)
  return config, model_cfg, objective, data.train.batch(0), next(data.eval.eval_batches(1))


def _on_one_device(tree):
  """[1, ...] shapes: pmap's leading device axis, for one device."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *np.shape(x)), jnp.result_type(x)),
                      tree)


def _compile(lowered):
  """Compiles for sm_90a; the program must hold Mosaic kernels."""
  assert MOSAIC_CALL in lowered.as_text(), "no Mosaic GPU kernel in the program"
  return lowered.compile()


def _steps(h100, config, model_cfg, objective):
  model = models.build_model(model_cfg)
  tx = optimizer.build_optimizer(config.optimizer, config.train.steps)
  p_train, p_eval = steps_lib.pmapped_steps(model, tx, objective, [h100])
  return p_train, p_eval, steps_lib.abstract(model_cfg, tx, config.train.seed)


@pytest.mark.parametrize("experiment, what", [
    ("tiny_gpt_synthetic", "causal GPT, packed documents (segment ids)"),
    ("tiny_bert", "MLM + NSP BERT, padded rows"),
    ("tiny_seq2seq", "encoder-decoder: self- and cross-attention"),
])
def test_pmapped_train_step_compiles(h100, tmp_path, experiment, what):
  config, model_cfg, objective, train_batch, _ = _run(experiment, tmp_path)
  if experiment == "tiny_gpt_synthetic":
    assert train_batch["segment_ids"].max() > 1, what  # some row packs two documents
  if experiment == "tiny_bert":
    assert model_cfg.nsp and not train_batch["padding_mask"].all(), what
  p_train, _, state = _steps(h100, config, model_cfg, objective)
  with kernels.target_device(h100):
    _compile(p_train.lower(_on_one_device(state), _on_one_device(train_batch)))


def _placed(h100, tree):
  sharding = jax.sharding.SingleDeviceSharding(h100)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x),
                                                     sharding=sharding), tree)


def test_evaluation_and_cached_decoding_compile(h100, tmp_path):
  """`fusedlm evaluate`'s pmapped step, and `fusedlm generate`'s program:
  prefill through the kernel, then cached steps of one query row (mosaic's
  decoding path) in a while loop."""
  config, model_cfg, objective, _, eval_batch = _run("tiny_gpt_synthetic", tmp_path)
  _, p_eval, state = _steps(h100, config, model_cfg, objective)
  prompt_len, new = 40, 8  # a prompt past the decoding path's 16 rows: the kernel
  generate = generation._compiled(model_cfg, Sampling(), new, prompt_len + new)
  args = _placed(h100, (state.params, np.zeros((2, prompt_len), np.int32),
                        np.zeros(2, np.int32)))
  ids = _placed(h100, (np.int32(0), np.int32(0)))  # eos, pad
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=ids[0].sharding)
  with kernels.target_device(h100):
    _compile(p_eval.lower(_on_one_device(state.params), _on_one_device(eval_batch)))
    _compile(generate.trace(*args, key, *ids).lower(lowering_platforms=("cuda",)))
