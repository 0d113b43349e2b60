"""A 2-device pmapped train step with attention="mosaic" equals attention="xla", on CPU.

The trainer's own step (research.training.steps, jax.pmap over an axis named
"batch" on two fake CPU devices) runs a packed tiny GPT once with the Mosaic
kernel, in Mosaic GPU's interpreter (tests/kernels/mosaic/interpreter_shim.py)
as a stand-in H100 would see it (kernels.target_device), and once with the
XLA reference; loss and every parameter's gradient must agree to the
kernel's float16 tolerances (tests/kernels/attention_cases.py). The
optimizer is SGD with rate 1, so the update is the gradient itself.

The `gpu`-marked copy runs the same step compiled on a Hopper GPU, with
attention="mosaic" and with "auto" (which resolves to it there).

Needs JAX >= 0.11 (CI's second pass); skipped elsewhere with the reason.
"""

import jax
import numpy as np
import optax
import pytest

from fusedlm import kernels
from fusedlm.research import models, objectives
from fusedlm.research.models import config as model_config
from fusedlm.research.runs.parallel import replicate, shard, unreplicate
from fusedlm.research.training import steps as steps_lib
from tests.kernels.attention_cases import TOLERANCE
from tests.kernels.mosaic import interpreter_shim as mosaic_interpret
from tests.kernels.stand_ins import H100

pytestmark = pytest.mark.skipif(
    not mosaic_interpret.SUPPORTED, reason=mosaic_interpret.REASON)

# One block, one head of 64: the smallest model that still runs every kernel
# (forward, dQ, dK/dV) per device. float16: the kernel's tighter tolerance.
# init_std 0.3: sharp enough attention that q and k get gradients of their
# own size (at 0.02 the scores are flat and dq ~ 1e-4 of dv).
CFG = model_config.tiny_gpt(vocab_size=64, hidden_size=64, num_layers=1, num_heads=1,
                            mlp_dim=128, max_len=64, dtype="float16", init_std=0.3)
SEQ = 64


def _batch():
  """Two rows (one a device), each packing two documents as the data pipeline does."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (2, SEQ + 1)).astype(np.int32)
  cut = np.array([[23], [41]])
  position = np.arange(SEQ)[None, :]
  second = position >= cut
  return {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "segment_ids": (1 + second).astype(np.int32),
      "positions": np.where(second, position - cut, position).astype(np.int32),
      # The last token of a document does not predict the next document's first.
      "loss_mask": (position != cut - 1).astype(np.float32),
      "weights": np.ones(2, np.float32),
  }


def _train_step(attention: str, devices):
  """(mean loss, gradients) of one pmapped train step on `devices`."""
  cfg = CFG.replace(attention=attention)
  tx = optax.sgd(1.0)
  state = steps_lib.create(cfg, tx, seed=0)
  p_train, _ = steps_lib.pmapped_steps(models.build_model(cfg), tx,
                                       objectives.get("causal"), devices)
  new, sums = p_train(replicate(state, devices), shard(_batch(), len(devices)))
  sums, new_params = unreplicate(jax.block_until_ready((sums, new.params)))
  grads = jax.tree.map(lambda old, new: np.asarray(old) - np.asarray(new),
                       state.params, new_params)
  return float(sums["loss_sum"] / sums["count"]), grads


def _assert_agree(loss, grads, ref_loss, ref_grads):
  out_tol, grad_tol = TOLERANCE[np.float16]
  np.testing.assert_allclose(loss, ref_loss, rtol=out_tol)
  # Each leaf is held to the tolerance as a fraction of its own largest
  # gradient (the kernel tests' floor of 1 would pass anything at these
  # magnitudes), but of no less than a tenth of the model's largest: the key
  # bias's gradient vanishes in exact arithmetic (it shifts a row's scores by
  # a constant, which softmax ignores) and holds only rounding noise.
  largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  flat, _ = jax.tree_util.tree_flatten_with_path(grads)
  for (path, grad), ref in zip(flat, jax.tree.leaves(ref_grads)):
    scale = max(float(np.abs(ref).max()), 0.1 * largest)
    np.testing.assert_allclose(grad, ref, rtol=0, atol=grad_tol * scale,
                               err_msg=jax.tree_util.keystr(path))
  # The attention projections' gradients flow through the kernel's backward.
  attention = ref_grads["transformer"]["layer_0"]["attention"]
  for name in ("query", "key", "value"):
    assert np.abs(attention[name]["kernel"]).max() > 1e-2, name


def test_pmapped_train_step_with_mosaic_matches_xla():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py fakes 8 CPU devices)")
  devices = jax.devices()[:2]
  reference = _train_step("xla", devices)
  with kernels.target_device(H100), mosaic_interpret.mosaic_interpreter():
    ours = _train_step("mosaic", devices)
  _assert_agree(*ours, *reference)


@pytest.mark.gpu
def test_compiled_on_a_hopper_gpu_auto_takes_mosaic_and_matches_xla():
  devices = jax.local_devices()[:2]
  if not kernels.target.is_hopper(devices[0]):
    pytest.skip("needs a GPU of compute capability 9.x")
  reference = _train_step("xla", devices)
  for attention in ("mosaic", "auto"):
    _assert_agree(*_train_step(attention, devices), *reference)
