"""Checkpointer: save/restore round trip, keep-N, tmp dirs never loaded, shapes checked."""

import numpy as np
import pytest

from research import checkpoint as ckpt_lib


def _state(width=4, value=1.0):
  return {"params": {"w": np.full((width, 3), value, np.float32)},
          "step": np.asarray(7, np.int32), "rng": np.asarray([1, 2], np.uint32)}


def test_round_trip_and_keep(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=2, use_async=True)
  for step in (1, 2, 3):
    ckpt.save(step, _state(value=float(step)))
  ckpt.wait()
  assert ckpt.manager.all_steps() == [2, 3]
  restored = ckpt.restore(3, _state())
  np.testing.assert_array_equal(restored["params"]["w"], 3.0)
  assert restored["rng"].dtype == np.uint32
  ckpt.close()


def test_interrupted_save_is_ignored(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, use_async=False)
  ckpt.save(1, _state())
  ckpt.close()
  # What a save killed before Orbax's final rename leaves behind:
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-123").mkdir()
  again = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, use_async=False)
  assert again.latest_step() == 1
  again.close()


def test_shape_mismatch_is_a_value_error(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, use_async=False)
  ckpt.save(1, _state(width=4))
  with pytest.raises(ValueError, match="does not fit"):
    ckpt.restore(1, _state(width=8))
  ckpt.close()


def test_config_mismatch_names_fields(tmp_path):
  import json
  (tmp_path / "config.json").write_text(json.dumps(
      {"resolved_model": {"hidden_size": 64, "num_layers": 2}}))
  ckpt_lib.check_compatible(tmp_path, {"hidden_size": 64, "num_layers": 2})
  with pytest.raises(ValueError, match=r"num_layers: 2 -> 3"):
    ckpt_lib.check_compatible(tmp_path, {"hidden_size": 64, "num_layers": 3})
