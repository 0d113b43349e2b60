"""ModelConfig: validation, dict round trips, presets."""

import pytest

from fusedlm.research.models import config as model_config
from fusedlm.research.models.config import ModelConfig


@pytest.mark.parametrize("name", sorted(model_config.presets))
def test_preset_round_trips_through_dict(name):
  cfg = model_config.presets[name]()
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_take_overrides():
  cfg = model_config.tiny_gpt(vocab_size=1000, position="rotary")
  assert (cfg.vocab_size, cfg.position) == (1000, "rotary")


def test_from_dict_names_unknown_keys():
  with pytest.raises(ValueError, match=r"\['hidden', 'layers'\]"):
    ModelConfig.from_dict({"hidden": 64, "layers": 2, "num_heads": 4})


def test_from_dict_accepts_integer_floats():
  # ConfigDict / JSON hand back 0 for 0.0.
  cfg = ModelConfig.from_dict({"dropout": 0, "layer_norm_eps": 1})
  assert isinstance(cfg.dropout, float) and cfg.layer_norm_eps == 1.0


@pytest.mark.parametrize("changes, message", [
    ({"kind": "seq2seq"}, "kind must be one of"),
    ({"hidden_size": 130}, "multiple of num_heads"),
    ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"num_kv_heads": 0}, "num_kv_heads must be None or a positive int"),
    ({"position": "alibi"}, "position must be one of"),
    ({"norm": "sandwich"}, "norm must be one of"),
    ({"activation": "relu"}, "activation must be one of"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"attention": "flash"}, "attention must be one of"),
    ({"vocab_size": 0}, "vocab_size must be >= 1"),
    ({"num_layers": 2.0}, "num_layers must be an int"),
    ({"num_labels": -1}, "num_labels must be >= 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"remat": "yes"}, "remat must be a bool"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
    ({"init_std": 0.0}, "init_std must be > 0"),
    ({"init_std": "0.02"}, "init_std must be a float"),
    ({"kind": "decoder", "nsp": True}, "nsp=True needs kind='encoder'"),
    ({"position": "rotary", "hidden_size": 12, "num_heads": 4},
     "head_dim .3. must be even"),
])
def test_bad_values_are_named(changes, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_dict(changes)


@pytest.mark.parametrize("changes, message", [
    (dict(attention_dropout=1.0), r"attention_dropout must be in \[0, 1\)"),
    (dict(attention_soft_cap=-1.0), "attention_soft_cap must be >= 0"),
    (dict(sliding_window=-2), "sliding_window must be >= 0"),
    (dict(attention="cudnn", attention_dropout=0.1, sliding_window=8),
     "attention='cudnn' does not take attention_dropout, sliding_window"),
    (dict(attention="tpu", dtype="float16"),
     "attention='tpu' takes dtype bfloat16 or float32"),
    (dict(attention="mosaic", dtype="float32"), "attention='mosaic': .*bfloat16 or float16"),
    (dict(attention="mosaic", dtype="bfloat16", position="relative", hidden_size=512,
          num_heads=2), "attention='mosaic': mosaic takes a bias at head dims up to 128"),
])
def test_attention_variant_values_are_checked(changes, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**changes)


def test_mosaic_takes_the_attention_variants():
  # Issue 25: dropout, a window, a soft-cap and a relative bias (head dim 64).
  ModelConfig(attention="mosaic", dtype="bfloat16", attention_dropout=0.1,
              sliding_window=8, attention_soft_cap=30.0, position="relative",
              hidden_size=128, num_heads=2)


def test_bert_base_keeps_the_original_attention_dropout():
  assert model_config.presets["bert_base"]().attention_dropout == 0.1


def test_derived_sizes():
  cfg = ModelConfig(hidden_size=64, num_heads=8, num_kv_heads=2)
  assert (cfg.head_dim, cfg.kv_heads) == (8, 2)
  assert ModelConfig(num_heads=4).kv_heads == 4
  assert model_config.bert_base().has_pooler
  assert not model_config.bert_base(nsp=False).has_pooler
  assert not model_config.gpt2_small(num_labels=2).has_pooler
