"""Data parallelism across processes on jax.distributed: 2 processes x 4 CPU
devices on 127.0.0.1 train exactly as 1 process x 8 devices, share
checkpoints both ways, and only process 0 writes run files."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fusedlm.research.runs import logger as run_logging
from fusedlm.research.runs import saved_run
from fusedlm.research.training import loop
from tests.research.conftest import ROOT, tiny_gpt_config

pytestmark = pytest.mark.slow
TIMEOUT_S = 600


def config_for(cache_dir, steps):
  """The tiny GPT at global batch 16: 2 rows on each of 8 devices."""
  config = tiny_gpt_config(cache_dir, steps)
  config.train.update(batch_size=16, log_every=1, eval_every=steps, eval_batches=2)
  config.optimizer.warmup_steps = 2
  config.checkpoint.update(every=2, keep=3)
  config.model.dropout = 0.1  # per-device dropout keys must line up too
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(workdir, cache_dir, steps, *overrides, num_processes=2, devices=4,
                  per_process=None):
  """Launches the worker processes; returns (returncode, stdout, stderr) of each.
  per_process[i]: extra overrides of process i only. Every process is killed
  if any runs past TIMEOUT_S."""
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.research.multiprocess_worker", str(port),
       str(num_processes), str(i), str(workdir), str(cache_dir), str(steps), *overrides,
       *(per_process or {}).get(i, ())],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(num_processes)]
  results = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=TIMEOUT_S)
      results.append((proc.returncode, out, err))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return results


def rows(workdir, split="train"):
  return {step: row for step, row in run_logging.read_metrics(workdir, split).items()}


def assert_same_run(a, b, steps):
  ra, rb = rows(a), rows(b)
  for step in steps:
    np.testing.assert_allclose(rb[step]["loss"], ra[step]["loss"], rtol=1e-5,
                               err_msg=f"train loss at step {step}")
    np.testing.assert_allclose(rb[step]["grad_norm"], ra[step]["grad_norm"], rtol=1e-4)
  last = max(steps)
  pa = saved_run.open_run(a).restore_params(last)[1]
  pb = saved_run.open_run(b).restore_params(last)[1]
  jax.tree_util.tree_map(
      # Adam turns rounding-level gradient differences of near-zero parameters
      # (summed over devices in another order) into ~1e-6 differences.
      lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5), pa, pb)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("multiprocess_cache"))


def test_two_processes_train_as_one_and_share_checkpoints(cache_dir, tmp_path):
  assert jax.local_device_count() == 8
  single, pair = tmp_path / "single", tmp_path / "pair"
  loop.train(config_for(cache_dir, 4), single, progress=False)
  results = run_processes(pair, cache_dir, 4)
  for code, out, err in results:
    assert code == 0, err[-3000:]
  assert_same_run(single, pair, range(1, 5))
  np.testing.assert_allclose(rows(pair, "eval")[4]["loss"], rows(single, "eval")[4]["loss"],
                             rtol=1e-5)

  # Only process 0 wrote: one row per step, one TensorBoard file, one lock.
  raw = [json.loads(line) for line in (pair / "metrics.jsonl").read_text().splitlines()]
  assert [(r["split"], r["step"]) for r in raw] == (
      [("train", s) for s in range(1, 5)] + [("eval", 4)])
  assert len(list((pair / "tensorboard").iterdir())) == 1
  assert sorted(p.name for p in pair.iterdir()) == [
      "checkpoints", "config.json", "metrics.jsonl", "tensorboard", "tokenizer",
      "train.lock"]

  # The pair's checkpoint resumes in one process, the single one's in a pair.
  shutil.copytree(single, tmp_path / "single_b")
  loop.train(config_for(cache_dir, 6), single, progress=False)
  out = loop.train(config_for(cache_dir, 6), pair, progress=False)
  assert out["start_step"] == 4
  assert_same_run(single, pair, range(5, 7))
  results = run_processes(tmp_path / "single_b", cache_dir, 6)
  for code, out, err in results:
    assert code == 0, err[-3000:]
  assert "start_step 4" in results[0][1]
  assert_same_run(single, tmp_path / "single_b", range(5, 7))


def test_processes_that_disagree_on_the_config_stop(cache_dir, tmp_path):
  results = run_processes(tmp_path, cache_dir, 2, per_process={1: ["train.seed=1"]})
  for code, _, err in results:
    assert code == 2, err[-2000:]
    assert "the processes disagree on the run config: process(es) [1]" in err
  assert not (tmp_path / "checkpoints").exists()


def test_a_global_batch_the_devices_cannot_split(cache_dir, tmp_path):
  results = run_processes(tmp_path, cache_dir, 2, "train.batch_size=12")
  for code, _, err in results:
    assert code == 2, err[-2000:]
    assert ("batch_size (12) must be a multiple of the 8 devices (2 process(es) x 4"
            " local)") in err


def test_an_unreachable_coordinator_is_an_error_not_a_hang(tmp_path):
  port = _free_port()
  done = subprocess.run(
      [sys.executable, "-c", "import sys; from fusedlm.research.runs import parallel;"
       "parallel.initialize(f'127.0.0.1:{sys.argv[1]}', 2, 1, timeout_s=5)", str(port)],
      capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode != 0
  assert "could not start process 1 of 2" in done.stderr
  assert f"127.0.0.1:{port}" in done.stderr and "within 5 s" in done.stderr
