"""Run logs: progress lines, metrics.jsonl, TensorBoard, MFU.

Every logged row goes to DIR/metrics.jsonl ({"step", "split", ...}) and to
TensorBoard event files in DIR/tensorboard (tensorboardX). Progress goes to
stderr: on a terminal one line rewritten in place, into a file or a pipe one
whole line per logged step (a log file reads line by line).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax

from fusedlm.research.data import partials

# Dense bf16 peak FLOP/s by jax device_kind (vendor data sheets, no sparsity).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
}


def peak_flops(device) -> float | None:
  """The device's bf16 peak, matching the longest known prefix; None if unknown."""
  kind = getattr(device, "device_kind", "")
  matches = [k for k in PEAK_FLOPS if kind.startswith(k)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def flops_per_token(model_cfg, params, seq_len: int) -> float:
  """Training FLOPs per token as nanoGPT counts them: 6 N + 12 L H Dh T.

  N counts non-embedding parameters (Kaplan et al.): the token and position
  tables are left out, and with them the tied output layer's matmul, so MFU is
  slightly understated for large vocabularies.
  """
  n = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if "embeddings" not in jax.tree_util.keystr(path):
      n += math.prod(leaf.shape)
  c = model_cfg
  return 6 * n + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len


def _format_seconds(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


METRICS_FILE = "metrics.jsonl"


class RunLogger:
  """Writes metric rows and keeps the progress line up to date."""

  def __init__(self, workdir, total_steps: int, start_step: int, tokens_per_step: int,
               flops_per_token: float, peak: float | None, num_devices: int,
               progress: bool = True, write: bool = True):
    """write=False (every process but 0 of a multi-process run): no files, no
    progress line; the calls still work."""
    self.workdir = Path(workdir)
    self.jsonl = self.tb = None
    if write:
      from tensorboardX import SummaryWriter  # Imported late: slow to import.
      truncate_metrics(self.workdir, start_step)
      self.jsonl = open(self.workdir / METRICS_FILE, "a")
      self.tb = SummaryWriter(str(self.workdir / "tensorboard"))
    progress = progress and write
    self.total, self.start = total_steps, start_step
    self.tokens_per_step = tokens_per_step
    self.flops_per_token, self.peak, self.devices = flops_per_token, peak, num_devices
    self.progress = progress
    # In place (\r) only on a terminal: a log file gets whole lines.
    self.in_place = progress and sys.stderr.isatty()
    self._t0 = time.perf_counter()
    self._last_t, self._last_step = self._t0, start_step
    self._paused_at = None
    self._pauses: list[tuple[float, float]] = []  # since the last train row

  def pause(self) -> None:
    """Stops the throughput clock (a checkpoint's host copy, an evaluation)."""
    self._paused_at = time.perf_counter()

  def resume(self) -> None:
    if self._paused_at is not None:
      self._pauses.append((self._paused_at, time.perf_counter()))
      self._paused_at = None

  def _busy_seconds(self, until: float) -> float:
    """Time from the last train row to `until`, less the pauses within it."""
    paused = sum(max(0.0, min(end, until) - max(begin, self._last_t))
                 for begin, end in self._pauses)
    self._pauses = [(b, e) for b, e in self._pauses if e > until]
    return until - self._last_t - paused

  def write(self, step: int, split: str, values: dict) -> None:
    if self.jsonl is None:
      return
    row = {"step": step, "split": split, **values}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    for key, value in values.items():
      if isinstance(value, (int, float)):
        self.tb.add_scalar(f"{split}/{key}", value, step)

  def train(self, step: int, summary: dict, lr: float, at: float | None = None,
            timing: bool = True) -> None:
    """Logs a train window ending at `step` (steps counted from 1), done at time
    `at` (time.perf_counter(); default now). Throughput leaves out pauses;
    timing=False (a row restored on resume) logs none."""
    now = time.perf_counter() if at is None else at
    steps = max(step - self._last_step, 1)
    tok_s = steps * self.tokens_per_step / max(self._busy_seconds(now), 1e-9)
    self._last_t, self._last_step = now, step
    values = {**summary, "learning_rate": lr}
    if timing:
      values["tokens_per_second"] = tok_s
      if self.peak:
        values["mfu"] = tok_s * self.flops_per_token / (self.peak * self.devices)
    self.write(step, "train", values)
    if self.progress:
      done = step - self.start
      eta = (now - self._t0) / max(done, 1) * (self.total - step)
      mfu = f" mfu {values['mfu']:.1%}" if "mfu" in values else ""
      speed = f" {tok_s:,.0f} tok/s{mfu}" if timing else ""
      line = (f"step {step}/{self.total} loss {summary.get('loss', float('nan')):.4f}"
              f" lr {lr:.2e}{speed} eta {_format_seconds(eta)}")
      sys.stderr.write(f"\r{line}   " if self.in_place else f"{line}\n")
      sys.stderr.flush()

  def eval(self, step: int, summary: dict) -> None:
    self.write(step, "eval", summary)
    if self.progress:
      sys.stderr.write(("\n" if self.in_place else "")
                       + f"[eval] step {step} loss {summary.get('loss', float('nan')):.4f}"
                       f" ppl {summary.get('perplexity', float('nan')):.2f}\n")
      sys.stderr.flush()

  def close(self) -> None:
    if self.in_place:
      sys.stderr.write("\n")
    if self.jsonl is not None:
      self.jsonl.close()
      self.tb.close()


class StepProfiler:
  """A jax.profiler trace of `steps` training steps into DIR/profile/process_<i>
  (TensorBoard's profile plugin reads it), starting two steps after `start`
  so the compile is not in it. steps=0: off."""

  SKIP = 2

  def __init__(self, workdir, start: int, steps: int):
    self.first = start + self.SKIP
    self.last = self.first + steps  # exclusive
    self.directory = Path(workdir) / "profile" / f"process_{jax.process_index()}"
    self.enabled = steps > 0
    self.active = False

  def step(self, step: int, state) -> None:
    """Called before running `step`; starts or stops the trace on its boundaries."""
    if not self.enabled:
      return
    if step == self.first:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active = True
    elif step == self.last:
      self.close(state)

  def close(self, state) -> None:
    if self.active:
      jax.block_until_ready(state)  # the traced steps' device work is in the trace
      jax.profiler.stop_trace()
      self.active = False


def _rows(path: Path) -> list[dict]:
  """The rows of metrics.jsonl; a half-written last row (a kill mid-write) is dropped."""
  if not path.exists():
    return []
  rows = []
  lines = path.read_text().splitlines()
  for number, line in enumerate(lines, 1):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if number == len(lines):
        break
      raise ValueError(f"{path}:{number}: not a JSON row") from None
  return rows


def truncate_metrics(workdir, step: int) -> None:
  """Drops the rows logged after `step`: a resume from the checkpoint at `step`
  logs them again, with the same values, so the file stays in step order
  without duplicates. Rewritten atomically."""
  path = Path(workdir) / METRICS_FILE
  rows = _rows(path)
  kept = [row for row in rows if row.get("step", 0) <= step]
  if len(kept) == len(rows) and (not path.exists() or path.read_text().endswith("\n")
                                 or not path.read_text()):
    return
  partials.publish(path, "".join(json.dumps(row) + "\n" for row in kept))


def read_metrics(workdir, split: str = "train") -> dict[int, dict]:
  """step -> the row of `split` logged for it (the last one, for files written
  before resumes truncated them)."""
  return {row["step"]: row for row in _rows(Path(workdir) / METRICS_FILE)
          if row.get("split") == split}
