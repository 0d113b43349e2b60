"""Trained tiny runs shared by the evaluation, generation and fine-tuning tests.

Each is trained once per test worker on the synthetic Markov corpus with the
byte tokenizer (nothing to train, one token per character, and a corpus a
2-layer model learns within tens of steps), on all 8 fake CPU devices, so the
tests that reload them also prove a checkpoint moves to another device count.
"""

import importlib.util
from pathlib import Path

import pytest

from fusedlm.research import run_config
from fusedlm.research.training import loop

ROOT = Path(__file__).resolve().parents[2]
TRAIN_STEPS = 40


def load_experiment(name: str, arg: str = ""):
  """experiments/<name>.py's get_config(arg), as `--config=experiments/<name>.py:arg` loads it."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("fusedlm_shared_cache"))


def _runlocal(name: str, cache_dir: str, steps: int):
  """The experiment's runlocal smoke config, run for `steps` steps."""
  config = run_config.runlocal(load_experiment(name, run_config.RUNLOCAL), steps)
  config.data.cache_dir = cache_dir
  return config


def tiny_gpt_config(cache_dir: str, steps: int = TRAIN_STEPS):
  """The synthetic tiny GPT (2 layers, width 64, seq 64), batch 16."""
  return _runlocal("tiny_gpt_synthetic", cache_dir, steps)


def tiny_bert_config(cache_dir: str, steps: int = TRAIN_STEPS):
  """tiny_bert's smoke size, on the same corpus and tokenizer as tiny_gpt_config."""
  return _runlocal("tiny_bert", cache_dir, steps)


@pytest.fixture(scope="session")
def trained_gpt(tmp_path_factory, shared_cache_dir) -> Path:
  """Workdir of a tiny GPT trained TRAIN_STEPS steps (checkpoints at half and end)."""
  workdir = tmp_path_factory.mktemp("trained_gpt")
  loop.train(tiny_gpt_config(shared_cache_dir), workdir, progress=False)
  return workdir


@pytest.fixture(scope="session")
def trained_bert(tmp_path_factory, shared_cache_dir) -> Path:
  """Workdir of a tiny BERT (MLM + NSP) trained TRAIN_STEPS steps."""
  workdir = tmp_path_factory.mktemp("trained_bert")
  loop.train(tiny_bert_config(shared_cache_dir), workdir, progress=False)
  return workdir
