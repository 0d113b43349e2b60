"""Config loading and validation: typos in files and in overrides are named."""

import sys
from pathlib import Path
from unittest import mock

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from fusedlm.research import run_config
from fusedlm.research.models import config as model_config
from tests.research.conftest import load_experiment

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ["tiny_gpt", "tiny_bert", "gpt2_small", "bert_base", "tiny_gpt_synthetic"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_validate(name):
  config = load_experiment(name)
  run_config.validate(config)
  model = run_config.build_model_config(config, config.data.vocab_size)
  assert model.kind == ("encoder" if config.objective == "mlm" else "decoder")


def test_reference_sizes():
  gpt = run_config.build_model_config(load_experiment("gpt2_small"), 50257)
  bert = run_config.build_model_config(load_experiment("bert_base"), 30522)
  assert (gpt.num_layers, gpt.hidden_size, gpt.max_len) == (12, 768, 1024)
  assert (bert.num_layers, bert.hidden_size, bert.max_len, bert.nsp) == (12, 768, 512, True)


def test_unknown_key_in_file_is_named():
  config = load_experiment("tiny_gpt")
  config.train.stepz = 10  # the typo a config file could hold
  with pytest.raises(ValueError, match=r"config\.train\.stepz"):
    run_config.validate(config)


def test_unknown_model_key_and_section_are_named():
  config = load_experiment("tiny_gpt")
  config.model.hidden = 10
  config.trainer = ml_collections.ConfigDict()
  with pytest.raises(ValueError, match=r"config\.model\.hidden.*|trainer"):
    run_config.validate(config)


def test_missing_key_is_named():
  config = load_experiment("tiny_gpt")
  del config.train["eval_batches"]
  with pytest.raises(ValueError, match="eval_batches"):
    run_config.validate(config)


def _parse(argv):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv,
                                  lock_config=True)
  argv = ["prog", f"--config={ROOT / 'experiments' / 'tiny_gpt.py'}", *argv]
  # config_flags reads the overrides from sys.argv itself.
  with mock.patch.object(sys, "argv", argv):
    fv(argv)
  return fv.config


def test_override_applies():
  assert _parse(["--config.train.steps=200"]).train.steps == 200


def test_unknown_key_in_override_is_an_error():
  with pytest.raises(Exception, match="stepz"):
    _parse(["--config.train.stepz=200"])


def test_bad_values():
  config = load_experiment("tiny_gpt")
  config.objective = "contrastive"
  with pytest.raises(ValueError, match="objective"):
    run_config.validate(config)
  config = load_experiment("tiny_gpt")
  config.model.preset = "gpt5"
  with pytest.raises(ValueError, match="preset"):
    run_config.validate(config)
  config = load_experiment("tiny_gpt")
  config.data.seq_len = 4096
  with pytest.raises(ValueError, match="max_len"):
    run_config.build_model_config(config, 300)


def test_classification_configs_have_their_own_schema():
  config = load_experiment("finetune_topics")
  run_config.validate(config)
  with config.unlocked():
    config.model.num_layers = 2
  with pytest.raises(ValueError, match="unknown keys in config.model: config.model.num_layers"):
    run_config.validate(config)
  config = load_experiment("finetune_topics")
  config.data.validation_fraction = 1.0
  with pytest.raises(ValueError, match="validation_fraction must be in"):
    run_config.validate(config)


def test_the_classifier_config_is_the_pretrained_model_with_a_head():
  config = load_experiment("finetune_topics")
  pretrained = model_config.presets["tiny_bert"](vocab_size=100, max_len=128)
  cfg = run_config.build_model_config(config, 100, pretrained, num_labels=5)
  assert cfg == pretrained.replace(num_labels=5, mlm=False, nsp=False, dropout=0.1)
  with pytest.raises(ValueError, match="the tokenizer has 99 tokens but the pretrained model 100"):
    run_config.build_model_config(config, 99, pretrained, num_labels=5)
  with pytest.raises(ValueError, match="at least 2 labels"):
    run_config.build_model_config(config, 100, pretrained, num_labels=1)
