"""Checkpoints a user can trust: damaged bytes found, NaN never saved, kills
during clean-up harmless, one trainer per workdir, metrics.jsonl that a resume
leaves as an uninterrupted run would, and one-line errors."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from fusedlm.research.runs import checkpoint as ckpt_lib
from fusedlm.research.runs import checksums, saved_run
from fusedlm.research.runs import logger as run_logging
from fusedlm.research.runs.lock import WorkdirLock
from fusedlm.research.training import eval_loop, loop
from tests.commands import fusedlm
from tests.research.conftest import ROOT, tiny_gpt_config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("trust_cache"))


def small(cache_dir, steps=6, **train_overrides):
  """The synthetic tiny GPT at batch 8, checkpoints every 2 steps, keep 2."""
  config = tiny_gpt_config(cache_dir, steps)
  config.train.update(batch_size=8, log_every=1, eval_batches=2, eval_every=steps)
  config.train.update(train_overrides)
  config.optimizer.warmup_steps = 2
  config.checkpoint.update(every=2, keep=2)
  return config


def flip_bytes(step_dir: Path, count=3, width=64):
  """What the issue did: 3 x 64 flipped bytes in every data file of a checkpoint."""
  rng = np.random.default_rng(0)
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and "/d/" in str(path) and path.stat().st_size > width:
      data = bytearray(path.read_bytes())
      for start in rng.integers(0, len(data) - width, count):
        for i in range(start, start + width):
          data[i] ^= 0xFF
      path.write_bytes(bytes(data))


def raw_rows(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def metric_rows(workdir):
  """Every row without its timing fields, in file order."""
  drop = {"tokens_per_second", "mfu"}
  return [{k: v for k, v in row.items() if k not in drop} for row in raw_rows(workdir)]


# 1. Damaged bytes.

def test_a_damaged_checkpoint_is_refused_by_evaluation(trained_gpt, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(trained_gpt, run_dir)
  flip_bytes(run_dir / "checkpoints" / "40")
  with pytest.raises(ValueError, match=r"checkpoints/40 is damaged or incomplete: .*changed"
                                       r"(.|\n)*Other checkpoints in .*: steps \[20\]"):
    eval_loop.evaluate_run(run_dir, max_batches=1)
  assert eval_loop.evaluate_run(run_dir, step=20, max_batches=1)["step"] == 20


def test_training_falls_back_past_a_damaged_checkpoint(cache_dir, tmp_path, capsys):
  config = small(cache_dir, steps=4)
  loop.train(config, tmp_path, progress=False)  # checkpoints 2 and 4
  flip_bytes(tmp_path / "checkpoints" / "4")
  config.train.steps = 6
  out = loop.train(config, tmp_path, progress=True)
  assert out["start_step"] == 2
  assert "checkpoints/4 is damaged or incomplete" in capsys.readouterr().err
  assert [p.name for p in (tmp_path / "checkpoints").iterdir() if ".damaged-" in p.name]
  assert saved_run.open_run(tmp_path).steps == (4, 6)  # retrained, not the damaged one


def _flip_one_byte(step_dir: Path, every_file: bool = False) -> None:
  """The lowest bit of the middle byte of the largest data file (or of each):
  a finite value stays finite, so only checksums can tell."""
  files = sorted((p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)),
                 key=lambda p: p.stat().st_size)
  for data_file in files if every_file else files[-1:]:
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    data_file.write_bytes(bytes(data))


def test_a_fallback_resumes_exactly_even_without_a_manifest(cache_dir, tmp_path):
  # A kill after an async save and before its manifest leaves the newest step
  # unverified by file checksums; a byte flipped there must still be found
  # (by the leaf checksums saved with the arrays), and the fallback must
  # replay exactly: every logged row and the final state as uninterrupted.
  config = small(cache_dir, steps=8)
  loop.train(config, tmp_path / "reference", progress=False)
  loop.train(config, tmp_path / "run", progress=False, stop_at=6)  # checkpoints 4, 6
  newest = tmp_path / "run" / "checkpoints" / "6"
  (newest / checksums.MANIFEST).unlink()
  _flip_one_byte(newest)
  out = loop.train(config, tmp_path / "run", progress=False)
  assert out["start_step"] == 4
  assert metric_rows(tmp_path / "run") == metric_rows(tmp_path / "reference")
  _, want = saved_run.open_run(tmp_path / "reference").restore_params()
  _, got = saved_run.open_run(tmp_path / "run").restore_params()
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_leaf_checksums_guard_the_parameters_evaluation_reads(trained_gpt, tmp_path):
  # A value that differs from the checksum recorded with it is refused, manifest
  # or not (here the record is changed, so that the mismatch is certain).
  run_dir = tmp_path / "run"
  shutil.copytree(trained_gpt, run_dir)
  newest = run_dir / "checkpoints" / "40"
  (newest / checksums.MANIFEST).unlink()
  record_file = newest / "extra" / "metadata"
  record = json.loads(record_file.read_text())
  leaf = next(name for name in record["state_sha256"] if name.startswith("params/"))
  record["state_sha256"][leaf] = "0" * 64
  record_file.write_text(json.dumps(record))
  with pytest.raises(ValueError, match=rf"checkpoints/40 is damaged: the restored values of"
                                       rf" {leaf} differ from the checksums"):
    saved_run.open_run(run_dir).restore_params(40)


def test_bytes_the_storage_layer_finds_damaged_are_a_damaged_checkpoint(trained_gpt, tmp_path):
  # OCDBT's own CRC-32C of its b-tree nodes (DATA_LOSS) counts as damage, which
  # training falls back past, not as a checkpoint that does not fit the config.
  run_dir = tmp_path / "run"
  shutil.copytree(trained_gpt, run_dir)
  newest = run_dir / "checkpoints" / "40"
  (newest / checksums.MANIFEST).unlink()
  _flip_one_byte(newest, every_file=True)
  with pytest.raises(checksums.DamagedCheckpointError, match=r"checkpoints/40 is damaged"):
    saved_run.open_run(run_dir).restore_params(40)


def test_every_finished_checkpoint_carries_checksums(trained_gpt):
  for step in saved_run.open_run(trained_gpt).steps:
    assert checksums.verify(trained_gpt / "checkpoints" / str(step))


# 2. NaN is never saved, a negative rate never trains.

def test_a_non_finite_state_is_never_saved(cache_dir, tmp_path, monkeypatch):
  config = small(cache_dir, steps=4)
  config.checkpoint.every = 1
  real = loop.optimizer.build_optimizer

  def nan_after_update(opt_cfg, steps):  # an optimizer that breaks the weights
    return optax.chain(real(opt_cfg, steps), optax.scale(float("nan")))
  monkeypatch.setattr(loop.optimizer, "build_optimizer", nan_after_update)
  # The norms of step 1's new parameters are NaN: the run stops before its save.
  with pytest.raises(FloatingPointError,
                     match=r"non-finite training metrics at step 1 \(.*param_norm_sum=nan.*\);"
                           r" stopping before saving it. The newest checkpoint, step none"):
    loop.train(config, tmp_path, progress=False)
  assert saved_run.open_run(tmp_path).steps == ()


def test_the_checkpointer_refuses_a_non_finite_state(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=2, use_async=False)
  ckpt.save(1, {"w": np.ones(3, np.float32), "mu": np.zeros(3, np.float32)})
  with pytest.raises(ckpt_lib.NonFiniteStateError,
                     match=r"state at step 2 holds non-finite values \(\['mu'\]\).*not"
                           r" saved. The newest checkpoint is step 1"):
    ckpt.save(2, {"w": np.ones(3, np.float32), "mu": np.array([0, np.inf, 0], np.float32)})
  ckpt.close()
  assert ckpt_lib.checkpoint_steps(tmp_path / "checkpoints") == (1,)


@pytest.mark.parametrize("rate", [-0.003, float("nan"), 0.0])
def test_a_learning_rate_that_cannot_train_is_refused(cache_dir, tmp_path, rate):
  config = small(cache_dir)
  config.optimizer.learning_rate = rate
  with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
    loop.train(config, tmp_path, progress=False)


# 3. Kills during the keep-N clean-up.

KILL_IN_CLEANUP = textwrap.dedent("""
    import os, shutil, signal, sys
    sys.path.append({root!r})  # for tests.*; site-packages first
    from fusedlm.research.training import loop
    from tests.research.runs.test_checkpoint_trust import small
    real = shutil.rmtree
    def rmtree_then_die(path, *args, **kwargs):
      # Deleting an old checkpoint step: remove half its files, then die as a
      # SIGKILL would. Other deletions (cache temporaries) go through.
      path = __import__("pathlib").Path(path)
      if "checkpoints" not in path.parts:
        return real(path, *args, **kwargs)
      files = [p for p in sorted(path.rglob("*")) if p.is_file()]
      for p in files[: len(files) // 2]:
        p.unlink()
      os.kill(os.getpid(), signal.SIGKILL)
    shutil.rmtree = rmtree_then_die
    loop.train(small({cache!r}, steps=6), {workdir!r}, progress=False)
""")


def test_a_kill_during_cleanup_leaves_only_complete_checkpoints(cache_dir, tmp_path):
  script = KILL_IN_CLEANUP.format(root=str(ROOT), cache=cache_dir, workdir=str(tmp_path))
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=600, cwd=ROOT)
  assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
  run = saved_run.open_run(tmp_path)
  assert run.steps, "the kill came after the first checkpoints"
  for step in run.steps:  # everything listed restores
    assert run.restore_params(step)[0] == step
  config = small(cache_dir, steps=6)
  loop.train(config, tmp_path, progress=False)
  assert saved_run.open_run(tmp_path).steps == (4, 6)  # keep=2 caught up
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if not p.name.isdigit()]


def test_keep_catches_up_with_leftover_steps(tmp_path):
  state = {"w": np.ones((2, 3), np.float32)}
  ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=5, use_async=False)
  for step in range(1, 6):
    ckpt.save(step, state)
  ckpt.close()
  again = ckpt_lib.Checkpointer(tmp_path, every=1, keep=2, use_async=True)
  again.save(6, state)
  again.close()
  assert ckpt_lib.checkpoint_steps(tmp_path / "checkpoints") == (5, 6)


# 4. One trainer per workdir.

def test_a_second_trainer_gets_one_line(cache_dir, tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time;"
       "from fusedlm.research.runs.lock import WorkdirLock;"
       "lock = WorkdirLock(sys.argv[1]); lock.acquire(); print('held', flush=True);"
       "time.sleep(120)", str(tmp_path)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=rf"is in use by another trainer \(pid {holder.pid} on"):
      loop.train(small(cache_dir), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock file is taken over.
  out = loop.train(small(cache_dir, steps=2), tmp_path, progress=False)
  assert out["start_step"] == 0
  assert (tmp_path / "train.lock").read_text() == ""  # released cleanly


def test_the_lock_is_released_on_errors(tmp_path):
  with pytest.raises(RuntimeError):
    with WorkdirLock(tmp_path):
      raise RuntimeError("boom")
  with WorkdirLock(tmp_path, progress=False):
    pass


# 5. metrics.jsonl after a resume; data changes.

def test_a_resume_rewrites_metrics_as_the_uninterrupted_run(cache_dir, tmp_path):
  # log_every 4 does not divide checkpoint.every 3; an eval is due at 3.
  config = small(cache_dir, steps=8, log_every=4, eval_every=3)
  config.checkpoint.every = 3
  loop.train(config, tmp_path / "full", progress=False)
  cut = tmp_path / "cut"
  # A run killed at step 5: rows up to 5 logged, checkpoint 3 the newest, and
  # (the kill fell between the commit and the eval row) no eval row at 3.
  loop.train(config, cut, progress=False, stop_at=5)
  shutil.rmtree(cut / "checkpoints" / "5")
  rows = [r for r in raw_rows(cut) if not (r["split"] == "eval" and r["step"] == 3)]
  (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = loop.train(config, cut, progress=False)
  assert out["start_step"] == 3
  assert metric_rows(cut) == metric_rows(tmp_path / "full")
  steps = [(r["split"], r["step"]) for r in raw_rows(cut)]
  assert len(steps) == len(set(steps))


def test_a_resume_that_changes_the_batches_is_refused(cache_dir, tmp_path):
  config = small(cache_dir, steps=2)
  loop.train(config, tmp_path, progress=False)
  before = (tmp_path / "config.json").read_text()
  config.train.steps = 4
  config.train.batch_size = 16
  config.data.seq_len = 32
  with pytest.raises(ValueError, match=r"train.batch_size: 8 -> 16.*data.seq_len: 64 -> 32"
                                       r"|data.seq_len: 64 -> 32.*train.batch_size: 8 -> 16"):
    loop.train(config, tmp_path, progress=False)
  assert (tmp_path / "config.json").read_text() == before
  out = loop.train(config, tmp_path, progress=False, allow_data_change=True)
  assert out["start_step"] == 2


def test_throughput_leaves_out_pauses(tmp_path):
  logger = run_logging.RunLogger(tmp_path, total_steps=4, start_step=0, tokens_per_step=100,
                                 flops_per_token=1.0, peak=None, num_devices=1,
                                 progress=False)
  t0 = logger._last_t
  logger._pauses.append((t0 + 1.0, t0 + 3.0))  # a 2 s save inside the window
  logger.train(2, {"loss": 1.0}, 1e-3, at=t0 + 4.0)  # 2 steps, 2 s busy
  logger.train(4, {"loss": 1.0}, 1e-3, at=t0 + 6.0)  # 2 steps, 2 s
  logger.close()
  speeds = [row["tokens_per_second"] for row in raw_rows(tmp_path)]
  np.testing.assert_allclose(speeds, [100.0, 100.0])


# One error path.

def test_train_errors_are_one_line(tmp_path):
  config = str(ROOT / "experiments" / "tiny_gpt_synthetic.py")
  typo = fusedlm("train", f"--config={config}", f"--workdir={tmp_path}",
                  "--config.train.stepz=3")
  assert typo.returncode == 2 and typo.stderr.strip().count("\n") == 0, typo.stderr
  assert "no field 'stepz'" in typo.stderr and 'Did you mean "steps"' in typo.stderr
  missing = fusedlm("train", f"--config={config}", f"--workdir={tmp_path}",
                     f"--config.data.corpus={tmp_path / 'nope' / '*.txt'}")
  assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
  assert missing.stderr.startswith("fusedlm train: error:")


BAD_INPUTS = {
    # name: (extra arguments, what the one line must say)
    "missing config file": (["--config={tmp}/nope.py"],
                            "cannot load the --config file: No such file or directory:"),
    "config syntax error": (["--config={tmp}/broken.py"],
                            "cannot load the --config file: {tmp}/broken.py:1:"),
    "negative eval_batches": (["--config={experiment}", "--config.train.eval_batches=-1"],
                              "config.train.eval_batches must be >= 0, got -1."),
    "zero log_every": (["--config={experiment}", "--config.train.log_every=0"],
                       "config.train.log_every must be >= 1, got 0."),
    "b2 of one": (["--config={experiment}", "--config.optimizer.b2=1.0"],
                  "config.optimizer.b2 must be < 1.0, got 1.0."),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_train_inputs_are_one_line_before_anything_runs(case, tmp_path):
  (tmp_path / "broken.py").write_text("def get_config(:\n  pass\n")
  args, message = BAD_INPUTS[case]
  fill = dict(tmp=tmp_path, experiment=ROOT / "experiments" / "tiny_gpt_synthetic.py")
  done = fusedlm("train", *(a.format(**fill) for a in args), f"--workdir={tmp_path}/run")
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
  assert done.stderr.startswith(f"fusedlm train: error: {message.format(**fill)}"), done.stderr
  assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_truncated_run_files_are_named(trained_gpt, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(trained_gpt, run_dir)
  config = run_dir / "config.json"
  config.write_text(config.read_text()[:100])
  with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
    saved_run.open_run(run_dir)
  shutil.copy(trained_gpt / "config.json", config)
  tokenizer = run_dir / "tokenizer" / "tokenizer.json"
  tokenizer.write_text(tokenizer.read_text()[:100])
  with pytest.raises(ValueError, match=r"cannot read the tokenizer .*tokenizer.json"):
    saved_run.open_run(run_dir)


def test_evaluate_exits_without_event_loop_noise(trained_gpt, tmp_path):
  done = fusedlm("evaluate", f"--workdir={trained_gpt}", "--max_batches=1",
                  f"--output={tmp_path / 'e.json'}")
  assert done.returncode == 0, done.stderr
  assert "Event loop is closed" not in done.stderr and "Traceback" not in done.stderr
