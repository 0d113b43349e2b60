"""Run files that survive kills: written atomically, never rewritten unchanged, and a
damaged tokenizer rebuilt on resume (when provably the run's) or named with the
way to recover."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fusedlm.research.data import partials
from fusedlm.research.runs import run_files, saved_run
from fusedlm.research.training import eval_loop, loop
from tests.research.conftest import ROOT, tiny_gpt_config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("run_files_cache"))


def small(cache_dir, steps=4):
  config = tiny_gpt_config(cache_dir, steps)
  config.train.update(batch_size=8, eval_batches=1)
  config.checkpoint.update(every=2, keep=2)
  return config


def _run_file_stats(workdir):
  paths = [workdir / run_files.CONFIG_FILE,
           *sorted((workdir / run_files.TOKENIZER_DIR).iterdir())]
  return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_publish_replaces_whole_and_skips_unchanged(tmp_path):
  path = tmp_path / "a" / "file.json"
  assert partials.publish(path, "first\n")
  stat = path.stat()
  assert not partials.publish(path, "first\n")  # same bytes: nothing written
  assert path.stat().st_ino == stat.st_ino and path.stat().st_mtime_ns == stat.st_mtime_ns
  assert partials.publish(path, b"second\n")
  assert path.read_text() == "second\n" and path.stat().st_ino != stat.st_ino
  assert sorted(p.name for p in path.parent.iterdir()) == ["file.json"]


def test_a_resume_rewrites_no_unchanged_run_file(cache_dir, tmp_path):
  loop.train(small(cache_dir), tmp_path, progress=False, stop_at=2)
  before = _run_file_stats(tmp_path)
  loop.train(small(cache_dir), tmp_path, progress=False)
  assert _run_file_stats(tmp_path) == before


KILL_IN_TOKENIZER_WRITE = textwrap.dedent("""
    import os, sys, time
    sys.path.append({root!r})  # for tests.*; site-packages first
    from fusedlm.research.data import partials
    from fusedlm.research.runs import run_files, saved_run
    run = saved_run.open_run({workdir!r})
    real = partials.publish
    def half_then_hang(path, data):
      # Writing tokenizer.json as an older fusedlm did, in place, half of it,
      # would leave it cut short; publish writes beside it. Hang half-way.
      if path.name == "tokenizer.json":
        raw = data.encode() if isinstance(data, str) else data
        with open(partials.partial_path(path), "wb") as f:
          f.write(raw[: len(raw) // 2])
        print("writing", flush=True)
        time.sleep(120)
      return real(path, data)
    partials.publish = half_then_hang
    # A changed tokenizer file forces the rewrite a resume would do.
    (run.workdir / "tokenizer" / "tokenizer.json").write_text(
        (run.workdir / "tokenizer" / "tokenizer.json").read_text() + " ")
    run_files.write_run_files(run.workdir, run.config, run.tokenizer,
                              run.model_cfg.to_dict())
""")


def test_a_kill_while_the_tokenizer_is_written_leaves_a_usable_run(cache_dir, tmp_path):
  config = small(cache_dir)
  loop.train(config, tmp_path, progress=False, stop_at=2)
  before = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
  writer = subprocess.Popen(
      [sys.executable, "-c", KILL_IN_TOKENIZER_WRITE.format(root=str(ROOT),
                                                            workdir=str(tmp_path))],
      stdout=subprocess.PIPE, text=True)
  try:
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
  finally:
    writer.wait(timeout=60)
  assert writer.returncode == -signal.SIGKILL
  # The kill left the partial write beside the file, not in it.
  assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == before + b" "
  assert eval_loop.evaluate_run(tmp_path, max_batches=1)["step"] == 2
  assert loop.train(config, tmp_path, progress=False)["start_step"] == 2


def test_a_damaged_tokenizer_is_named_then_rebuilt_by_the_resume(cache_dir, tmp_path, capsys):
  config = small(cache_dir)
  loop.train(config, tmp_path, progress=False, stop_at=2)
  path = tmp_path / "tokenizer" / "tokenizer.json"
  intact = path.read_bytes()
  path.write_bytes(intact[: len(intact) // 3])  # what a kill did to in-place writes
  with pytest.raises(ValueError, match=r"cannot read the tokenizer .*tokenizer.json.*; resume"
                                       r" the run \(fusedlm train .*\).* or restore tokenizer/"):
    saved_run.open_run(tmp_path)
  out = loop.train(config, tmp_path, progress=True)
  assert out["start_step"] == 2
  assert ("rebuilt it from the run's corpus and settings (its SHA-256 matches config.json's)"
          in capsys.readouterr().err)
  assert path.read_bytes() == intact
  assert saved_run.open_run(tmp_path).tokenizer.fingerprint


def test_a_rebuilt_tokenizer_that_differs_is_refused(cache_dir, tmp_path):
  config = small(cache_dir)
  loop.train(config, tmp_path, progress=False, stop_at=2)
  record = (tmp_path / "config.json").read_text()
  fingerprint = saved_run.open_run(tmp_path).tokenizer.fingerprint
  (tmp_path / "config.json").write_text(record.replace(fingerprint, "0" * 64))
  (tmp_path / "tokenizer" / "tokenizer.json").write_text("{")
  with pytest.raises(ValueError, match=r"rebuilt from the run's corpus and settings differs"
                                       r" from the one config.json records .* restore"):
    loop.train(config, tmp_path, progress=False)
  assert (tmp_path / "tokenizer" / "tokenizer.json").read_text() == "{"  # nothing written


def test_a_truncated_config_json_says_how_to_recover(cache_dir, tmp_path):
  loop.train(small(cache_dir), tmp_path, progress=False, stop_at=2)
  config_path = tmp_path / "config.json"
  config_path.write_text(config_path.read_text()[:50])
  with pytest.raises(ValueError, match=r"config.json is not valid JSON .* delete it and"
                                       r" resume with the run's --config"):
    saved_run.open_run(tmp_path)
  os.remove(config_path)
  assert loop.train(small(cache_dir), tmp_path, progress=False)["start_step"] == 2
  assert saved_run.open_run(tmp_path).steps == (2, 4)
