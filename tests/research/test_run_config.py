"""Config loading and validation: typos in files and in overrides are named."""

import sys
from pathlib import Path
from unittest import mock

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from research import run_config
from tests.research.test_train import load_experiment

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
  config.objective = "seq2seq"
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
