"""The "auto" rule: per call, the fastest implementation that takes the call on the device.

Devices are stand-ins (tests/kernels/stand_ins.py), so the rule is checked
for an H100, an A100, a CPU and a TPU on any machine and either JAX; the
calls are jax.ShapeDtypeStructs, as the rule reads only static facts. The
dispatch tests check that dot_product_attention runs what the rule names.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedlm import kernels
from fusedlm.kernels import attention as entry
from fusedlm.kernels import explain_implementation, resolve_implementation, target_device
from tests.kernels.stand_ins import A100, CPU, H100, H200, TPU, mosaic_jax  # noqa: F401

pytestmark = pytest.mark.usefixtures("mosaic_jax")


def call(dtype=jnp.bfloat16, head_dim=64, v_head_dim=None, q_len=256, kv_len=256):
  q = jax.ShapeDtypeStruct((2, q_len, 8, head_dim), dtype)
  k = jax.ShapeDtypeStruct((2, kv_len, 2, head_dim), dtype)
  v = jax.ShapeDtypeStruct((2, kv_len, 2, v_head_dim or head_dim), dtype)
  return q, k, v


@pytest.mark.parametrize("device", [H100, H200], ids=["h100", "h200"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
def test_hopper_picks_mosaic_for_16_bit_inputs_and_its_head_dims(device, dtype, head_dim):
  choice = explain_implementation("auto", *call(dtype, head_dim), device=device)
  assert choice.implementation == "mosaic", choice


# Each variant of the entry point, as its keyword argument (issue 25 wired
# every one into the Mosaic kernel but the per-head boolean mask).
VARIANTS = {
    "dropout_rate": dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)),
    "bias": dict(bias=jax.ShapeDtypeStruct((1, 8, 256, 256), jnp.float32)),
    "local_window_size": dict(local_window_size=(128, 0)),
    "logits_soft_cap": dict(logits_soft_cap=30.0),
    "return_lse": dict(return_lse=True),
    "causal_alignment": dict(causal_alignment="top_left"),
}


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("head_dim, v_head_dim", [(64, None), (128, 64), (256, 256)])
def test_hopper_keeps_the_variants_mosaic_takes_on_mosaic(name, head_dim, v_head_dim):
  choice = explain_implementation("auto", *call(head_dim=head_dim, v_head_dim=v_head_dim),
                                  device=H100, **VARIANTS[name])
  if name == "bias" and head_dim > 128:
    assert choice.implementation == "pallas" and "bias at head dims up to 128" in choice.reason
  else:
    assert choice.implementation == "mosaic", choice


def test_the_mask_mosaic_lacks_falls_back_to_pallas_naming_it():
  mask = jax.ShapeDtypeStruct((1, 8, 256, 256), jnp.bool_)
  choice = explain_implementation("auto", *call(), device=H100, mask=mask, **VARIANTS["bias"])
  assert choice.implementation == "pallas"
  assert choice.reason == "mosaic does not take mask"


@pytest.mark.parametrize("kwargs, reason", [
    (dict(dtype=jnp.float32), "bfloat16 or float16"),
    (dict(head_dim=320), "head dims up to 256, not 320"),
    (dict(head_dim=64, v_head_dim=384), "head dims up to 256, not 384"),
])
def test_inputs_mosaic_lacks_fall_back_to_pallas(kwargs, reason):
  choice = explain_implementation("auto", *call(**kwargs), device=H100)
  assert choice.implementation == "pallas" and reason in choice.reason


def test_plain_values_of_the_variants_keep_mosaic():
  plain = dict(bias=None, mask=None, causal_alignment="bottom_right",
               local_window_size=None, logits_soft_cap=None, dropout_rate=0.0,
               dropout_rng=None, return_lse=False)
  assert resolve_implementation("auto", *call(), device=H100, **plain) == "mosaic"


@pytest.mark.parametrize("device, expected, reason", [
    (A100, "pallas", "compute capability 8.0"),
    (CPU, "xla", "cpu backend"),
    (TPU, "tpu", "TPU backend"),
])
def test_other_devices(device, expected, reason):
  choice = explain_implementation("auto", *call(), device=device)
  assert choice.implementation == expected and reason in choice.reason


def test_block_sizes_pin_their_kernel():
  q, k, v = call()
  assert resolve_implementation("auto", q, k, v, device=H100,
                                block_sizes=kernels.BlockSizes()) == "pallas"
  assert resolve_implementation("auto", q, k, v, device=A100,
                                block_sizes=kernels.MosaicBlockSizes()) == "mosaic"


@pytest.mark.parametrize("implementation", ["mosaic", "pallas", "xla", "cudnn"])
def test_a_named_implementation_is_kept(implementation):
  for device in (H100, A100, CPU):
    choice = explain_implementation(implementation, *call(), device=device)
    assert (choice.implementation, choice.reason) == (implementation, "requested")


def test_decoding_sized_calls_name_mosaics_decoding_path():
  choice = explain_implementation("auto", *call(q_len=1, kv_len=1024), device=H100)
  assert choice.implementation == "mosaic"
  assert "q_len 1 <= 16: its XLA decoding path" in choice.reason
  assert "decoding" not in explain_implementation(
      "auto", *call(q_len=17, kv_len=1024), device=H100).reason


def test_the_device_comes_from_the_target_context():
  with target_device(H100):
    assert resolve_implementation("auto", *call()) == "mosaic"
    with target_device(A100):
      assert resolve_implementation("auto", *call()) == "pallas"
    assert resolve_implementation("auto", *call()) == "mosaic"
  expected = explain_implementation("auto", *call(), device=jax.devices()[0])
  assert resolve_implementation("auto", *call()) == expected.implementation


def test_a_jax_without_the_mosaic_interpreter_and_compiler_keeps_to_pallas(monkeypatch):
  monkeypatch.setattr(entry, "_jax_runs_mosaic", lambda: False)
  choice = explain_implementation("auto", *call(), device=H100)
  assert choice.implementation == "pallas" and "mosaic needs JAX >= 0.11" in choice.reason


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    resolve_implementation("flash", *call(), device=H100)


# Dispatch: the entry point runs what the rule names. The kernels are stood
# in for (their own tests check them), so this runs on every JAX.

@pytest.fixture
def ran(monkeypatch):
  names = []

  def stand_in(name):
    def run(q, k, v, **kwargs):
      names.append(name)
      return jnp.zeros(q.shape[:3] + v.shape[3:], q.dtype)
    return run
  monkeypatch.setattr(entry, "mosaic_attention", stand_in("mosaic"))
  monkeypatch.setattr(entry, "flash_attention", stand_in("pallas"))
  monkeypatch.setattr(entry, "reference_attention", stand_in("xla"))
  monkeypatch.setattr(entry.mosaic_decode, "decode_attention", stand_in("mosaic decode"))
  return names


def _arrays(q_len=128, kv_len=128, dtype=jnp.bfloat16):
  return [jnp.zeros(s.shape, s.dtype) for s in call(dtype, q_len=q_len, kv_len=kv_len)]


def test_auto_runs_mosaic_on_hopper_and_its_decoding_path_for_one_row(ran):
  with target_device(H100):
    kernels.dot_product_attention(*_arrays(), causal=True, interpret=True)
    kernels.dot_product_attention(*_arrays(q_len=1), interpret=True)
    kernels.dot_product_attention(*_arrays(), logits_soft_cap=5.0, interpret=True)
    kernels.dot_product_attention(*_arrays(), mask=jnp.ones((1, 1, 128, 128), bool),
                                  interpret=True)
  with target_device(A100):
    kernels.dot_product_attention(*_arrays(), interpret=True)
  with target_device(CPU):
    kernels.dot_product_attention(*_arrays())
  assert ran == ["mosaic", "mosaic decode", "mosaic", "pallas", "pallas", "xla"]


def test_mosaic_receives_the_variant_arguments(monkeypatch):
  received = {}
  def mosaic(q, k, v, **kwargs):
    received.update(kwargs)
    return jnp.zeros(q.shape, q.dtype)
  monkeypatch.setattr(entry, "mosaic_attention", mosaic)
  key = jax.random.key(1)
  with target_device(H100):
    kernels.dot_product_attention(
        *_arrays(), local_window_size=(16, 0), logits_soft_cap=5.0, dropout_rate=0.1,
        dropout_rng=key, return_lse=True, causal_alignment="top_left", interpret=True)
  assert received["local_window_size"] == (16, 0) and received["logits_soft_cap"] == 5.0
  assert received["dropout_rate"] == 0.1 and received["dropout_rng"] is key
  assert received["return_lse"] and received["causal_alignment"] == "top_left"
  assert "mask" not in received


def test_auto_under_jit_resolves_when_traced(ran):
  q, k, v = _arrays()
  with target_device(H100):
    out = jax.jit(lambda q, k, v: kernels.dot_product_attention(
        q, k, v, interpret=True))(q, k, v)
  assert ran == ["mosaic"]
  np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)
