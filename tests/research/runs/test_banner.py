"""What a newcomer sees: the start-up banner, whole progress lines in a log file, a
finished run that says so, and no debris from a run refused at set-up."""

import sys

import numpy as np
import pytest

from fusedlm.research import objectives
from fusedlm.research.models import config as model_config
from fusedlm.research.runs import banner
from fusedlm.research.training import eval_loop, loop
from tests.research.conftest import tiny_gpt_config

BANNER_KEYS = ("run", "model", "attention", "devices", "batch", "data", "objective",
               "workdir")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shared_cache_dir):
  """A 4-step tiny GPT trained with progress on, then started again; the stderr of both."""
  workdir = tmp_path_factory.mktemp("banner")
  config = tiny_gpt_config(shared_cache_dir, steps=4)
  config.train.log_every = 2
  with pytest.MonkeyPatch.context() as patch:
    outputs = []
    for _ in range(2):
      capture = _Capture()
      patch.setattr(sys, "stderr", capture)
      result = loop.train(config, workdir, num_devices=2, progress=True)
      outputs.append((capture.text, result))
  return workdir, outputs


class _Capture:
  """A stderr that is a file, not a terminal."""

  def __init__(self):
    self.text = ""

  def write(self, text):
    self.text += text

  def flush(self):
    pass

  def isatty(self):
    return False


def test_banner_names_the_run_before_the_first_step(first_run):
  workdir, [(err, _), _] = first_run
  lines = [line for line in err.splitlines()
           if line != f"fusedlm train: preparing the data for {workdir} ..."]
  assert lines[0] == f"fusedlm train: {workdir}"
  keys = [line.split()[0] for line in lines[1:1 + len(BANNER_KEYS)]]
  assert tuple(keys) == BANNER_KEYS
  block = "\n".join(lines[1:1 + len(BANNER_KEYS)])
  assert "new, 4 steps" in block
  assert "decoder, 2 layers x 64 wide, 2 heads of 32;" in block
  assert "parameters (float32 storage, float32 compute)" in block
  assert "attention  xla" in block
  assert "2 x cpu (1 process)" in block
  assert "16 rows x 64 tokens = 1,024 tokens a step (8 rows a device)" in block
  assert "corpus synthetic, byte tokenizer, vocabulary 261" in block
  assert f"workdir    {workdir}" in block
  first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
  assert first_step == 1 + len(BANNER_KEYS)


def test_progress_into_a_file_is_whole_lines(first_run):
  _, [(err, _), _] = first_run
  assert "\r" not in err
  steps = [line for line in err.splitlines() if line.startswith("step ")]
  assert [line.split()[1] for line in steps] == ["2/4", "4/4"]
  assert any(line.startswith("[eval] step 4 loss") for line in err.splitlines())


def test_progress_on_a_terminal_is_one_line_in_place(shared_cache_dir, tmp_path, monkeypatch):
  capture = _Capture()
  capture.isatty = lambda: True
  monkeypatch.setattr(sys, "stderr", capture)
  config = tiny_gpt_config(shared_cache_dir, steps=2)
  config.train.log_every = 1
  loop.train(config, tmp_path, num_devices=1, progress=True)
  assert "\rstep 1/2 loss" in capture.text and "\rstep 2/2 loss" in capture.text


def test_a_finished_run_says_so(first_run):
  _, [(_, first), (err, again)] = first_run
  assert "already complete at step 4 of 4: nothing to train" in err
  assert not [line for line in err.splitlines() if line.startswith("step ")]
  assert again["already_complete"] and not first["already_complete"]
  assert again["eval"]["loss"] == first["eval"]["loss"]


def test_the_summary_is_rounded_and_labelled(first_run):
  _, [(_, result), _] = first_run
  line = eval_loop.format_summary(result["eval"], "causal")
  loss, perplexity, accuracy = (result["eval"][k] for k in ("loss", "perplexity", "accuracy"))
  assert line.startswith(f"loss {loss:.4f}, perplexity {perplexity:.2f},"
                         f" accuracy {accuracy:.2%} (over ")
  assert line.endswith(" tokens)")


@pytest.mark.parametrize("before", ["absent", "empty", "holding a file"])
def test_a_run_refused_at_set_up_leaves_no_debris(shared_cache_dir, tmp_path, before):
  workdir = tmp_path / "run"
  if before != "absent":
    workdir.mkdir()
  if before == "holding a file":
    (workdir / "notes.txt").write_text("mine")
  config = tiny_gpt_config(shared_cache_dir, steps=2)
  config.data.corpus = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(FileNotFoundError, match="no files match"):
    loop.train(config, workdir, num_devices=1, progress=False)
  listing = {"absent": None, "empty": [], "holding a file": ["notes.txt"]}[before]
  assert (sorted(p.name for p in workdir.iterdir()) if workdir.exists() else None) == listing


def test_start_lines():
  from fusedlm.research import run_config
  config = run_config.defaults()
  assert banner.describe_start(0, 1000, config).startswith("new, 1000 steps")
  assert banner.describe_start(500, 1000, config).startswith("resuming at step 500 of 1000")
  config.optimizer.accumulation_steps = 4
  assert "(250 updates of 4 micro-batches)" in banner.describe_start(0, 1000, config)


def test_auto_attention_names_what_each_kind_of_call_resolves_to():
  cfg = model_config.tiny_gpt()
  tokens = np.zeros((2, 16), np.int32)
  batch = {"inputs": tokens, "targets": tokens, "loss_mask": np.ones((2, 16), np.float32)}
  causal = objectives.get("causal")
  described = banner.describe_attention(cfg.replace(attention="auto"), causal, batch)
  assert described.startswith(f"auto: self-attention x{cfg.num_layers} -> "), described
  assert banner.describe_attention(cfg.replace(attention="xla"), causal, batch) == "xla"
