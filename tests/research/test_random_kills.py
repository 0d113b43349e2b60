"""A training run SIGKILLed at random moments (start-up, steps, saves, the
keep-N clean-up) and restarted until it finishes ends bit-equal to an
uninterrupted run, with only complete checkpoints listed and the same
metrics.jsonl rows.

FUSEDLM_KILLS sets the number of kills (CI: 3) and FUSEDLM_KILL_STEPS the
run's length (CI: 24); the issue's acceptance run used 20 kills over 80 steps.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fusedlm.research.runs import checkpoint as ckpt_lib
from fusedlm.research.training import optimizer, steps
from tests.research.conftest import ROOT, tiny_gpt_config

pytestmark = pytest.mark.slow
STEPS = int(os.environ.get("FUSEDLM_KILL_STEPS", "24"))

WORKER = """
import sys
sys.path.append({root!r})  # for tests.*; site-packages first
from fusedlm.research.training import loop
from tests.research.test_random_kills import kill_config
loop.train(kill_config({cache!r}), {workdir!r}, progress=False)
"""


def kill_config(cache_dir):
  """Checkpoints every 2 steps, keep 2, async saves: kills often land in saves
  and clean-ups. log_every 3 does not divide checkpoint.every."""
  config = tiny_gpt_config(cache_dir, STEPS)
  config.train.update(batch_size=8, log_every=3, eval_every=8, eval_batches=2)
  config.optimizer.warmup_steps = 2
  config.model.dropout = 0.1
  config.checkpoint.update(every=2, keep=2)
  return config


def _state(workdir):
  run = ckpt_lib.open_run(workdir)
  config = run.config
  tx = optimizer.build_optimizer(config.optimizer, config.train.steps)
  ckpt = ckpt_lib.Checkpointer(workdir, 2, 2)
  try:
    return ckpt.restore(run.steps[-1], steps.abstract(run.model_cfg, tx, config.train.seed))
  finally:
    ckpt.close()


def _newest_step(workdir) -> int:
  steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps, default=0)


def _wait_for_a_new_row(proc, workdir, after: int, launched: float,
                        timeout_s: float = 600.0) -> None:
  """Until this run logs a train row past step `after` (or exits). Rows a killed
  run logged past its last checkpoint are still in the file until the new run
  drops them, so only a file written since the launch counts."""
  deadline = time.monotonic() + timeout_s
  path = workdir / "metrics.jsonl"
  while proc.poll() is None and time.monotonic() < deadline:
    if path.exists() and path.stat().st_mtime > launched:
      for line in path.read_text().splitlines():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # being written
        if row.get("split") == "train" and row["step"] > after:
          return
    time.sleep(0.05)


def _rows(workdir):
  drop = {"tokens_per_second", "mfu"}
  return [{k: v for k, v in json.loads(line).items() if k not in drop}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_random_kills_resume_exactly(tmp_path):
  kills = int(os.environ.get("FUSEDLM_KILLS", "3"))
  cache = str(tmp_path / "cache")
  script = lambda workdir: WORKER.format(root=str(ROOT), cache=cache, workdir=str(workdir))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

  def launch(workdir):
    return subprocess.Popen([sys.executable, "-c", script(workdir)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

  reference = launch(tmp_path / "reference")
  _, err = reference.communicate(timeout=900)
  assert reference.returncode == 0, err[-3000:]

  rng = random.Random(0)
  workdir = tmp_path / "killed"
  killed = 0
  log = []  # (where the kill fell, checkpoints listed after it), shown with -s
  for _ in range(kills + 20):
    newest = _newest_step(workdir)
    launched = time.time()
    proc = launch(workdir)
    if killed < kills:
      # A fifth of the kills during start-up (imports, caches, compile); the
      # rest at a random moment once this run has logged a step of its own
      # (steps, async saves, checksums and the keep-N clean-up).
      if rng.random() < 0.2:
        time.sleep(rng.uniform(0.5, 4.0))
        where = "start-up"
      else:
        _wait_for_a_new_row(proc, workdir, newest, launched)
        time.sleep(rng.uniform(0.0, 1.5))
        where = "training"
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        killed += 1
      proc.wait(timeout=60)
      listed = ckpt_lib.open_run(workdir).steps if (workdir / "config.json").exists() else ()
      for step in listed:  # whatever moment the kill hit, every listed step is whole
        ckpt_lib.open_run(workdir).restore_params(step)
      log.append((where, listed))
      if proc.returncode == 0:
        break
    else:
      _, err = proc.communicate(timeout=900)
      assert proc.returncode == 0, err[-3000:]
      break
  assert killed >= 1, "every run finished before its kill: lengthen STEPS"
  print(f"\n{killed} kills in {len(log)} launches (where, checkpoints listed after): {log}")

  assert ckpt_lib.open_run(workdir).steps == ckpt_lib.open_run(tmp_path / "reference").steps
  want, got = _state(tmp_path / "reference"), _state(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)  # bit-equal
  assert _rows(workdir) == _rows(tmp_path / "reference")
  assert not [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
