"""A training run SIGKILLed at random moments and restarted until it finishes ends
bit-equal to an uninterrupted run, with only complete checkpoints listed and the
same metrics.jsonl rows.

The kinds of event, drawn at random for each life:
  start-up    a kill in the first seconds (imports, caches, compile)
  training    a kill once the life has logged a step (steps, async saves,
              checksums, the keep-N clean-up)
  run files   the life must rewrite its run files (tokenizer.json damaged
              before it, config.json changed by a setting that leaves the
              batches alone), and is killed while it writes one
  flip        between two lives, one bit of the newest checkpoint's largest
              data file is flipped and its manifest removed (as a kill before
              the manifest leaves it): the next life must fall back past it
              and still replay exactly
After every event each listed checkpoint must restore and the run must
reopen (config.json and tokenizer readable); the summary says, per kind, what
the events left behind.

FUSEDLM_KILLS sets the number of events (CI: 4) and FUSEDLM_KILL_STEPS the
run's length (CI: 24).
"""

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fusedlm.research.runs import checkpoint as ckpt_lib
from fusedlm.research.models.config import ModelConfig
from fusedlm.research.runs import checksums, run_files, saved_run
from fusedlm.research.training import optimizer, steps
from tests.research.conftest import ROOT, tiny_gpt_config

pytestmark = pytest.mark.slow
STEPS = int(os.environ.get("FUSEDLM_KILL_STEPS", "24"))
KINDS = ("start-up", "training", "run files", "flip")

WORKER = """
import sys, time
sys.path.append({root!r})  # for tests.*; site-packages first
from fusedlm.research.data import partials
from fusedlm.research.training import loop
from tests.research.test_random_kills import kill_config
if {slow_publish!r}:
  real = partials.publish
  def announced(path, data):  # a window in which the harness kills the writer
    print(f"publishing {{path.name}}", file=sys.stderr, flush=True)
    time.sleep(0.5)
    return real(path, data)
  partials.publish = announced
loop.train(kill_config({cache!r}, {asynchronous!r}), {workdir!r}, progress=False)
"""


def kill_config(cache_dir, asynchronous: bool = True):
  """Checkpoints every 2 steps, keep 2: kills often land in saves and clean-ups.
  log_every 3 does not divide checkpoint.every. `asynchronous` changes
  config.json (forcing its rewrite) but not the batches or the numbers."""
  config = tiny_gpt_config(cache_dir, STEPS)
  config.train.update(batch_size=8, log_every=3, eval_every=8, eval_batches=2)
  config.optimizer.warmup_steps = 2
  config.model.dropout = 0.1
  config.checkpoint.update(every=2, keep=2)
  config.checkpoint["async"] = asynchronous
  return config


def _state(workdir):
  run = saved_run.open_run(workdir)
  config = run.config
  tx = optimizer.build_optimizer(config.optimizer, config.train.steps)
  ckpt = ckpt_lib.Checkpointer(workdir, 2, 2)
  try:
    return ckpt.restore(run.steps[-1], steps.abstract(run.model_cfg, tx, config.train.seed))
  finally:
    ckpt.close()


def _newest_step(workdir) -> int:
  steps_ = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps_, default=0)


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


def _wait_for_a_publish(proc, name: str, timeout_s: float = 600.0) -> bool:
  """Until the worker announces it is publishing `name` (True), or exits."""
  deadline = time.monotonic() + timeout_s
  while proc.poll() is None and time.monotonic() < deadline:
    line = proc.stderr.readline()
    if line.strip() == f"publishing {name}":
      return True
  return False


def _flip_newest(workdir: Path) -> int:
  newest = workdir / "checkpoints" / str(_newest_step(workdir))
  (newest / checksums.MANIFEST).unlink(missing_ok=True)
  data_file = max((p for p in newest.rglob("*") if p.is_file() and "/d/" in str(p)),
                  key=lambda p: p.stat().st_size)
  data = bytearray(data_file.read_bytes())
  data[len(data) // 2] ^= 0x01
  data_file.write_bytes(bytes(data))
  return _newest_step(workdir)


def _rows(workdir):
  drop = {"tokens_per_second", "mfu"}
  return [{k: v for k, v in json.loads(line).items() if k not in drop}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _aftermath(workdir: Path, harness_tokenizer: bytes | None = None,
               flipped: int | None = None) -> tuple[tuple[int, ...], bool, list[int]]:
  """(steps listed, whether the run is usable, listed steps that fail to restore).

  Damage the harness made itself is not the kill's: a tokenizer.json still
  holding exactly the bytes the harness cut it to (the next resume rebuilds
  it), and the step it flipped (the next life moves it aside).
  """
  if not (workdir / "config.json").exists():
    return (), True, []  # killed before the run files: a fresh start next time
  tokenizer_json = workdir / "tokenizer" / "tokenizer.json"
  if harness_tokenizer is not None and tokenizer_json.read_bytes() == harness_tokenizer:
    # Not reopenable until a resume rebuilds the tokenizer; the rest must be whole.
    record = json.loads((workdir / "config.json").read_text())  # whole, or this raises
    model_cfg = ModelConfig.from_dict(record[run_files.RESOLVED_MODEL])
    listed = ckpt_lib.checkpoint_steps(workdir / "checkpoints")
    lost = []
    for step in listed:
      if step == flipped:
        continue
      try:
        ckpt_lib.restore_params(workdir / "checkpoints", step, model_cfg)
      except ValueError:
        lost.append(step)
    return listed, True, lost
  try:
    run = saved_run.open_run(workdir)
  except (ValueError, FileNotFoundError):
    return ckpt_lib.checkpoint_steps(workdir / "checkpoints"), False, []
  lost = []
  for step in run.steps:
    if step == flipped:
      continue
    try:
      run.restore_params(step)
    except ValueError:
      lost.append(step)
  return run.steps, True, lost


def test_random_kills_resume_exactly(tmp_path):
  events = int(os.environ.get("FUSEDLM_KILLS", "4"))
  cache = str(tmp_path / "cache")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

  def launch(workdir, slow_publish=False, asynchronous=True):
    script = WORKER.format(root=str(ROOT), cache=cache, workdir=str(workdir),
                           slow_publish=slow_publish, asynchronous=asynchronous)
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

  reference = launch(tmp_path / "reference")
  _, err = reference.communicate(timeout=900)
  assert reference.returncode == 0, err[-3000:]

  rng = random.Random(0)
  workdir = tmp_path / "killed"
  done = 0
  asynchronous = True
  cut = None  # the tokenizer.json bytes the harness left, until a life rewrites them
  log = []  # (kind, steps listed after, reopens, lost)
  for _ in range(3 * events + 20):
    newest = _newest_step(workdir)
    kind = rng.choice(KINDS) if done < events else None
    if kind == "flip" and newest < 4:
      kind = "training"  # nothing to fall back to yet
    if kind == "flip":
      flipped = _flip_newest(workdir)
      done += 1
      log.append((kind, *_aftermath(workdir, harness_tokenizer=cut, flipped=flipped)))
      kind = "training" if done < events else None  # the life after the flip
    slow = kind == "run files" and (workdir / "config.json").exists()
    if slow:
      tokenizer_json = workdir / "tokenizer" / "tokenizer.json"
      cut = tokenizer_json.read_bytes()[:1000]
      tokenizer_json.write_bytes(cut)  # damaged earlier (a pre-atomic fusedlm's kill)
      asynchronous = not asynchronous  # and a changed config.json
    launched = time.time()
    proc = launch(workdir, slow_publish=slow, asynchronous=asynchronous)
    if kind is None:
      _, err = proc.communicate(timeout=900)
      assert proc.returncode == 0, err[-3000:]
      break
    if kind == "start-up":
      time.sleep(rng.uniform(0.5, 4.0))
    elif kind == "run files" and slow:
      _wait_for_a_publish(proc, rng.choice(["tokenizer.json", "config.json"]))
      time.sleep(rng.uniform(0.0, 0.4))
    else:
      kind = "training"
      _wait_for_a_new_row(proc, workdir, newest, launched)
      time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      done += 1
    proc.wait(timeout=60)
    log.append((kind, *_aftermath(workdir, harness_tokenizer=cut)))
    if proc.returncode == 0:
      break
  assert done >= 1, "every run finished before its event: lengthen STEPS"

  summary = collections.defaultdict(lambda: [0, 0, 0])  # events, unusable, lost
  for kind, _, reopens, lost in log:
    summary[kind][0] += 1
    summary[kind][1] += not reopens
    summary[kind][2] += len(lost)
  rows_differ = sum(a != b for a, b in zip(_rows(workdir), _rows(tmp_path / "reference")))
  rows_differ += abs(len(_rows(workdir)) - len(_rows(tmp_path / "reference")))
  print(f"\n{done} events in {len(log)} lives; per kind: events, runs left unusable,"
        " checkpoints lost:")
  for kind in KINDS:
    if kind in summary:
      print(f"  {kind:<10} {summary[kind][0]:>3} {summary[kind][1]:>3} {summary[kind][2]:>3}")
  print(f"  final: metrics.jsonl rows that differ from the uninterrupted run: {rows_differ}")
  print(f"  lives (kind, checkpoints listed after, reopens, lost): {log}")

  assert all(reopens and not lost for _, _, reopens, lost in log), log
  assert (saved_run.open_run(workdir).steps
          == saved_run.open_run(tmp_path / "reference").steps)
  want, got = _state(tmp_path / "reference"), _state(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)  # bit-equal
  assert rows_differ == 0
  leftovers = [p.name for p in (workdir / "checkpoints").iterdir()
               if not p.name.isdigit() and ".damaged-" not in p.name]
  assert not leftovers
