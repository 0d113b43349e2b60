"""The training loop: trains the configured model, checkpoints it, and resumes where it stopped.

  result = train(config, "runs/tiny_gpt")   # `fusedlm train` and `fusedlm finetune` call this

Rerunning with the same --workdir resumes from the newest intact checkpoint
(research.runs.checkpoint verifies its checksums and falls back past a damaged
one): the state carries the step (= the data position, batch(step) is pure)
and the dropout RNG, and the checkpoint the partial log window, so the resumed
losses and metrics.jsonl rows equal an uninterrupted run's (rows logged after
the checkpoint are dropped and logged again). A resume that would change the
batches (run_files.DATA_FIELDS) is refused unless --allow_data_change. A
state with NaN or Inf values is never saved; one trainer per workdir.

train.steps counts optimizer updates (as research.training.optimizer does): with
optimizer.accumulation_steps = k the loop takes steps * k micro-batches
(optax.MultiSteps averages each k). The state's step, the data position, the
logged step and log_every / eval_every / checkpoint.every count micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import sys
import threading
import time
from pathlib import Path

import jax

from fusedlm.research import models, objectives, run_config
from fusedlm.research.runs import banner, parallel, run_files
from fusedlm.research.runs import checkpoint as ckpt_lib
from fusedlm.research.runs import logger as run_logging
from fusedlm.research.runs.lock import WorkdirLock
from fusedlm.research.runs.parallel import replicate, unreplicate
from fusedlm.research.runs.warm_start import WarmStart, transfer_params
from fusedlm.research.training import optimizer
from fusedlm.research.training import steps as steps_lib
from fusedlm.research.training.eval_loop import evaluate_batches
from fusedlm.research.training.prefetch import Prefetcher

DATA_NOTICE_SECONDS = 1.0  # data preparation longer than this is announced


class NonFiniteLossError(FloatingPointError):
  """The loss (or a gradient, parameter or update norm) became NaN or Inf; the
  state of that step is not saved, and the newest checkpoint is a good one."""


def train(config, workdir, *, devices=None, num_devices: int | None = None,
          progress: bool = True, stop_at: int | None = None,
          warm_start: WarmStart | None = None, allow_data_change: bool = False) -> dict:
  """Runs (or resumes) the training job; returns the final eval summary and more.

  devices / num_devices pick the pmap devices (default: every device of every
  process, parallel.run_devices); tests use them to compare 1 and 8 devices in
  one process. In a multi-process run (parallel.initialize) every process
  calls train() alike: each feeds its own share of every global batch, the
  step reduces across all of them, and only process 0 writes logs and run
  files (all take part in checkpoint saves). stop_at ends the
  run after that step (saving a checkpoint there), as an interruption would.
  warm_start (fusedlm finetune) supplies the pretrained tokenizer, model and
  parameters a classification config starts from; a resume reads its own.
  allow_data_change lets a resume change the fields that decide the batches
  (run_files.DATA_FIELDS), which is refused otherwise.

  One trainer per workdir (run_lock, held by process 0); the lock is held
  until the last save is written.
  """
  run_config.validate(config)
  objective = objectives.get(config.objective)
  if objective.fine_tunes and warm_start is None:
    raise ValueError(f"a {objective.name} config fine-tunes a pretrained run: launch it"
                     " with fusedlm finetune --init_from DIR.")
  devices = list(devices) if devices is not None else parallel.run_devices(num_devices)
  if config.train.batch_size % len(devices):
    raise ValueError(
        f"config.train.batch_size ({config.train.batch_size}) must be a multiple of the"
        f" {len(devices)} devices ({jax.process_count()} process(es) x"
        f" {len(parallel.local_devices(devices))} local).")
  parallel.check_same_config(run_config.to_json(config))
  primary = parallel.is_primary()
  workdir = Path(workdir)
  # A run refused before its first step leaves no trace (an empty checkpoints/,
  # a train.lock, a config.json) in a workdir that held no run before.
  before = {p.name for p in workdir.iterdir()} if workdir.is_dir() else None
  fresh = primary and not (before or set()) & {ckpt_lib.CHECKPOINT_DIR, run_files.CONFIG_FILE}
  lock = WorkdirLock(workdir, progress) if primary else contextlib.nullcontext()
  progress = progress and primary
  stage = _Stage()
  try:
    with lock:
      stage.locked = True
      return _train_locked(config, workdir, objective, devices, progress, stop_at,
                           warm_start, allow_data_change, stage)
  except BaseException:
    if fresh and stage.locked and not stage.started:
      _remove_set_up(workdir, before)
    raise


@dataclasses.dataclass
class _Stage:
  """How far a run got: the workdir lock taken, the first step started."""
  locked: bool = False
  started: bool = False


def _remove_set_up(workdir: Path, before: set[str] | None) -> None:
  """Removes what a refused set-up added to a workdir that held no run: the
  folder itself if this run made it, else the entries that were not there."""
  if before is None:
    shutil.rmtree(workdir, ignore_errors=True)
    return
  for path in workdir.iterdir():
    if path.name in before:
      continue
    if path.is_dir():
      shutil.rmtree(path, ignore_errors=True)
    else:
      path.unlink(missing_ok=True)


def _train_locked(config, workdir, objective, devices, progress, stop_at, warm_start,
                  allow_data_change, stage) -> dict:
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint.every, config.checkpoint.keep,
                               config.checkpoint["async"])
  try:
    return _train_opened(ckpt, config, workdir, objective, devices, progress, stop_at,
                         warm_start, allow_data_change, stage)
  finally:
    # Waits for an async save in flight, also on a NaN stop. Also when the
    # set-up fails (missing data, a refused resume): Orbax's background
    # threads must end before the process does, or they print tracebacks at
    # interpreter exit under the one-line error.
    ckpt.close()


def _train_opened(ckpt, config, workdir, objective, devices, progress, stop_at,
                  warm_start, allow_data_change, stage) -> dict:
  n_local = len(parallel.local_devices(devices))  # this process's pmap shards
  primary = parallel.is_primary()
  resuming = ckpt.latest_step() is not None
  # On resume, the workdir's own tokenizer: the data must be tokenized as before.
  # A damaged one is rebuilt below from the run's settings, then checked.
  tokenizer, damage = (run_files.tokenizer_for_resume(workdir) if resuming
                       else (None, None))
  if tokenizer is None and warm_start is not None:
    tokenizer = warm_start.tokenizer
  # Process 0 trains the tokenizer and fills the token cache; the others then
  # read what it wrote rather than building the same files at the same time.
  if not primary:
    parallel.barrier("fusedlm:data")
  # Training a tokenizer or tokenizing a corpus can take minutes: say so if it
  # does (a cached or refused data set says nothing: the banner, or the error,
  # comes at once).
  notice = threading.Timer(DATA_NOTICE_SECONDS, lambda: print(
      f"fusedlm train: preparing the data for {workdir} ...", file=sys.stderr, flush=True))
  if progress:
    notice.start()
  try:
    data = objective.train_data(config, tokenizer)
  finally:
    notice.cancel()
  if primary:
    parallel.barrier("fusedlm:data")
  # Evaluations run during training: an empty validation split fails now, not
  # after the first eval_every steps.
  if next(iter(data.eval.eval_batches(1)), None) is None:
    raise ValueError("the validation split gives no evaluation batch (too little"
                     " held-out data for one row); give more data, a larger"
                     " validation fraction, or a shorter data.seq_len.")
  model_cfg = run_config.build_model_config(
      config, data.tokenizer.vocab_size,
      warm_start.model_cfg if warm_start is not None else None,
      len(data.label_names or ()))
  if resuming:
    run_files.check_resumable(workdir, config, model_cfg.to_dict(),
                              allow_data_change=allow_data_change)
    if damage is not None:
      rebuilt = run_files.check_rebuilt_tokenizer(workdir, data.tokenizer, damage)
      if progress:
        print(rebuilt, file=sys.stderr)

  accum = config.optimizer.accumulation_steps
  updates = config.train.steps
  total = updates * accum  # micro-batches
  opt_cfg = config.optimizer.copy_and_resolve_references()
  if opt_cfg.warmup_steps > updates:  # a short smoke run (--config.train.steps=20)
    with opt_cfg.unlocked():
      opt_cfg.warmup_steps = updates
  tx = optimizer.build_optimizer(opt_cfg, updates)
  lr_schedule = optimizer.learning_rate_schedule(opt_cfg, updates)
  model = models.build_model(model_cfg)
  transfer = None
  window: dict = {}  # summed train metrics since the last log row (saved with checkpoints)
  restored = ckpt.restore_latest(steps_lib.abstract(model_cfg, tx, config.train.seed),
                                 progress) if resuming else None
  if restored is not None:
    _, host_state, extra = restored
    window.update(extra.get("window", {}))
  else:
    host_state = steps_lib.create(model_cfg, tx, config.train.seed)
    if warm_start is not None:
      params, transfer = transfer_params(warm_start.params, host_state.params)
      host_state = host_state.replace(params=params, opt_state=tx.init(params))
      if progress:
        print(f"warm start from {warm_start.source}: {transfer.describe()}", file=sys.stderr)
  # Only now, every check passed: a refused resume leaves config.json as it was.
  if primary:
    run_files.write_run_files(workdir, config, data.tokenizer, model_cfg.to_dict(),
                              data.label_names)
  start = int(host_state.step)
  if progress:
    print(f"fusedlm train: {workdir}", file=sys.stderr)
    print(banner.format_banner(
        workdir=workdir.absolute(), start=start, total=total, config=config,
        model_cfg=model_cfg, num_params=banner.parameter_count(host_state.params),
        attention=banner.describe_attention(model_cfg, objective, data.train.batch(start)),
        devices=devices,
        objective=objective.name, tokenizer=data.tokenizer), file=sys.stderr, flush=True)
  state = replicate(host_state, devices)
  del host_state
  p_train, p_eval = steps_lib.pmapped_steps(model, tx, objective, devices)

  seq_len = config.data.seq_len
  logger = run_logging.RunLogger(
      workdir, total, start, config.train.batch_size * seq_len,
      run_logging.flops_per_token(model_cfg, models.abstract_params(model_cfg), seq_len),
      run_logging.peak_flops(devices[0]), len(devices), progress, write=primary)
  profiler = run_logging.StepProfiler(workdir, start, config.train.profile_steps)

  def evaluate(step):
    logger.pause()  # evaluation time is not training throughput
    summary = evaluate_batches(
        p_eval, state.params, data.eval.eval_batches(config.train.eval_batches or None),
        n_local)
    logger.eval(step, summary)
    logger.resume()
    return summary

  def eval_due(step: int) -> bool:
    return step % config.train.eval_every == 0 or step == total

  pending = None  # (step, its metric sums: on the devices, or already on the host)

  def to_host(item):
    """(step, host sums) of a step; NonFiniteLossError if its loss is not finite."""
    step, sums = item
    if not isinstance(sums, dict) or any(not isinstance(v, float) for v in sums.values()):
      sums = {k: float(v) for k, v in unreplicate(sums).items()}
    bad = {k: v for k, v in sums.items() if not math.isfinite(v)}
    if bad:
      raise NonFiniteLossError(
          f"non-finite training metrics at step {step}"
          f" ({', '.join(f'{k}={v}' for k, v in sorted(bad.items()))}); stopping before"
          f" saving it. The newest checkpoint, step {ckpt.newest_intact_label()} in"
          f" {ckpt.directory}, holds only finite values.")
    return step, sums

  def log_due(step: int) -> bool:
    return step % config.train.log_every == 0 or step == total

  def record(step, sums, at: float):
    """Adds a step to the log window; writes the row when due. `at`: when the
    loop was done with the step (time.perf_counter()), the row's time stamp."""
    for k, v in sums.items():
      window[k] = window.get(k, 0.0) + v
    if log_due(step):
      logger.train(step, objectives.summarize(window), float(lr_schedule(step // accum)),
                   at=at)
      window.clear()

  def catch_up(step: int) -> dict:
    """On resume at `step`: the rows a kill after its checkpoint may have lost.

    The checkpoint's window holds `step`'s metrics, not yet logged: its train
    row is written from it (without throughput, which was not measured here)
    unless the killed run wrote it; an evaluation due at `step` runs unless
    its row is there. In the order an uninterrupted run writes them.
    """
    logged = run_logging.read_metrics(workdir, "train")
    evaluated = run_logging.read_metrics(workdir, "eval")
    missing_row = log_due(step) and step not in logged
    missing_eval = eval_due(step) and step not in evaluated
    restored_summary: dict = {}

    def row():
      logger.train(step, objectives.summarize(window), float(lr_schedule(step // accum)),
                   timing=False)

    if missing_row and step == total:  # the last row precedes the final eval
      row()
    if missing_eval:
      restored_summary = evaluate(step)
    if missing_row and step != total:  # mid-run, the eval of a step comes first
      row()
    if log_due(step):
      window.clear()
    return restored_summary

  summary: dict = {}
  batches = None
  t0 = time.perf_counter()
  try:
    if start:
      summary = catch_up(start) or summary
    end = total if stop_at is None else min(stop_at, total)
    finished_at = time.perf_counter()  # when the loop was done with the last step
    stage.started = True
    # This process's share of each global batch, [local devices, per_device,
    # ...], assembled and put on the devices ahead of its step.
    batches = Prefetcher(data.train.batch, range(start, end), devices)
    for step in range(start, end):
      iteration_start = time.perf_counter()
      profiler.step(step, state)
      state, sums = p_train(state, batches.get(step))
      if pending is not None:
        # The previous step's metrics, while this one runs. Its row is stamped
        # with the start of this iteration: every row's throughput covers whole
        # loop iterations, whether its metrics came in late or at a checkpoint.
        record(*to_host(pending), at=iteration_start)
      pending = (step + 1, sums)  # logged as step + 1: micro-batches taken so far
      done = step + 1
      if done % config.checkpoint.every == 0 or done == end:
        pending = to_host(pending)  # never checkpoint a state whose loss is not finite
        finished_at = time.perf_counter()
        # The window as it will be once `done` is recorded, so a resume from
        # here logs the same rows as this run.
        # The window with `done` in it, not yet logged: a resume from here
        # logs (or, if this run already did, skips) the same row.
        saved_window = {k: window.get(k, 0.0) + v for k, v in pending[1].items()}
        logger.pause()  # the save's host copy is not training time
        ckpt.save(done, unreplicate(state), force=done == end,
                  extra={"window": saved_window})
        logger.resume()
        if done == end:  # no next iteration to log it: its row precedes the eval's
          record(*pending, at=finished_at)
          pending = None
      if eval_due(done):
        summary = evaluate(done)
    if pending is not None:
      record(*to_host(pending), at=finished_at)
    if start >= total and not summary:  # a finished run, started again
      row = run_logging.read_metrics(workdir, "eval").get(total)
      summary = ({k: v for k, v in row.items() if k not in ("step", "split")}
                 if row else evaluate(total))
  finally:
    if batches is not None:
      batches.close()
    profiler.close(state)
    logger.close()
  return {"eval": summary, "start_step": start, "seconds": time.perf_counter() - t0,
          "model": model_cfg, "transfer": transfer, "objective": objective.name,
          "step": total if stop_at is None else min(stop_at, total),
          "already_complete": start >= total}

