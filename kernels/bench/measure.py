"""Measuring one cell of the attention benchmark: time, FLOPs, memory, error.

A cell is one implementation at one problem (batch, sequence length, heads,
head dim, dtype), causal or not, for one pass ("fwd", or "fwd+bwd" = `jax.grad`
of a scalar loss w.r.t. q, k and v). `kernels.bench.benchmark` sweeps the cells and
`kernels.bench.report` prints and plots them.

Method:
  * compile first (`jax.jit(f).lower(...).compile()`), so no timed call
    compiles; then `warmup` untimed calls;
  * time each of `reps` calls on the host clock around `jax.block_until_ready`,
    rotating among input sets whose total exceeds the L2 cache, and keep the
    median;
  * memory: the compiled executable's `memory_analysis()` (arguments + outputs
    + temporaries - aliased), the same static measure on CPU and GPU;
  * error: relative Frobenius norm ||out - ref|| / ||ref|| against
    `kernels.reference_attention` on the float32-upcast inputs, at a reduced
    size where the reference fits (see `measure_error`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fusedlm.kernels.attention import dot_product_attention
from fusedlm.kernels.bench import variant_cells
from fusedlm.kernels.mosaic.tiles import MosaicBlockSizes
from fusedlm.kernels.reference import reference_attention

IMPLEMENTATIONS = ("pallas", "mosaic", "tpu", "xla", "cudnn", "jax-triton")
PASSES = ("fwd", "fwd+bwd")
BWD_FLOP_FACTOR = 3.5  # fwd+bwd = 2.5 backward matmul passes + 1 forward.
FLOP_FORMULA = (
    "fwd = 4*B*H*N*N*D (halved when causal; the window's band only); fwd+bwd"
    " = 3.5 x fwd"
)
MEMORY_MEASURE = (
    "compiled executable memory_analysis(): argument + output + temp - alias"
    " bytes (static, per call)"
)


@dataclasses.dataclass(frozen=True)
class Problem:
  """Sizes of one attention call; layout [batch, seq_len, num_heads, head_dim]."""

  batch: int
  seq_len: int
  num_heads: int
  head_dim: int
  dtype: str  # "bfloat16", "float16" or "float32"

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (self.batch, self.seq_len, self.num_heads, self.head_dim)

  @property
  def array_bytes(self) -> int:
    return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize


def attention_flops(problem: Problem, causal: bool, pass_: str,
                    variant: str = "none") -> float:
  """FLOPs of one call: 4*B*H*D per visible (query, key) pair (N*N, halved
  causal, the band of a local window) forward, x3.5 fwd+bwd."""
  p = problem
  pairs = variant_cells.visible_pairs(variant, causal, p.seq_len)
  flops = 4.0 * p.batch * p.num_heads * pairs * p.head_dim
  return flops * (BWD_FLOP_FACTOR if pass_ == "fwd+bwd" else 1.0)


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def on_tpu() -> bool:
  return jax.default_backend() == "tpu"


def label(implementation: str) -> str:
  """Row name; Pallas kernels off their device run in the interpreter and say so."""
  interpreted = ((implementation in ("pallas", "jax-triton") and not on_gpu())
                 or (implementation == "tpu" and not on_tpu()))
  return f"{implementation} (interpret)" if interpreted else implementation


def mosaic_blocks(implementation: str) -> MosaicBlockSizes | None:
  """The MosaicBlockSizes of an implementation "mosaic:field=value+..." (a
  tuning configuration, from the class defaults), None for plain "mosaic"."""
  name, _, spec = implementation.partition(":")
  if name != "mosaic" or not spec:
    return None
  fields = {}
  for item in spec.split("+"):
    key, _, value = item.partition("=")
    if not key.isidentifier() or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"{implementation}: give mosaic:field=value+... with"
                       f" integer values, got {item!r}.")
    fields[key] = int(value)
  try:
    return MosaicBlockSizes(**fields)
  except TypeError as e:
    raise ValueError(f"{implementation}: {e}") from e


def attention_fn(implementation: str, causal: bool, variant: str = "none"):
  """f(q, k, v, extra) -> out for one implementation and variant (extra: the
  variant's arrays, `variant_cells.arrays`); ValueError if unavailable."""
  interpret = not on_gpu()
  kwargs = variant_cells.static_kwargs(variant, causal)
  base, blocks = implementation.partition(":")[0], mosaic_blocks(implementation)
  if base in ("pallas", "mosaic", "tpu", "xla", "cudnn"):
    if base == "pallas":
      kwargs["interpret"] = interpret
    if base == "tpu":
      kwargs["interpret"] = not on_tpu()
    if blocks is not None:
      kwargs["block_sizes"] = blocks
    return lambda q, k, v, extra: dot_product_attention(
        q, k, v, causal=causal, implementation=base, **kwargs, **extra)
  if implementation == "jax-triton":
    if variant != "none":
      raise ValueError(f"jax-triton: takes no {variant}.")
    try:
      from jax.experimental.pallas.ops.gpu import attention as jax_attention
    except ImportError as e:
      raise ValueError(f"jax-triton: not in this JAX ({e}).") from e
    # Default blocks (128); it needs seq_len a multiple of min(128, seq_len).
    return lambda q, k, v, extra: jax_attention.mha(
        q, k, v, None, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=causal,
        interpret=interpret)
  raise ValueError(
      f"unknown implementation {implementation!r}; choose from"
      f" {', '.join(IMPLEMENTATIONS)} (or mosaic:field=value+...).")


def pass_fn(attn, pass_: str):
  """The jitted function a cell times: fwd(q, k, v, extra) or fwd+bwd(q, k,
  v, ct, extra), the gradient w.r.t. q, k, v and the variant's arrays."""
  if pass_ == "fwd":
    return jax.jit(attn)

  def loss(q, k, v, extra, ct):  # ct: [B, N, H, D], a fixed random cotangent
    return jnp.sum(attn(q, k, v, extra).astype(jnp.float32) * ct.astype(jnp.float32))

  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  return jax.jit(lambda q, k, v, ct, extra: grad(q, k, v, extra, ct))


def make_input_sets(problem: Problem, n_sets: int, seed: int):
  """n_sets tuples (q, k, v, ct), each [B, N, H, D] standard normal."""
  sets = []
  for i in range(n_sets):
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i), 4)
    sets.append(tuple(
        jax.random.normal(key, problem.shape, problem.dtype) for key in keys))
  return jax.block_until_ready(sets)


def num_input_sets(problem: Problem, rotate_bytes: int) -> int:
  """Sets to rotate so q, k, v over all sets exceed rotate_bytes (at least 2)."""
  set_bytes = 3 * problem.array_bytes
  return min(64, max(2, math.ceil(rotate_bytes / set_bytes)))


def call_args(input_set, pass_: str, extra: dict):
  return (*input_set[:3], extra) if pass_ == "fwd" else (*input_set, extra)


def memory_bytes(compiled) -> dict | None:
  """Static device memory of one call of a compiled executable, in bytes."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  parts = {
      "argument": stats.argument_size_in_bytes,
      "output": stats.output_size_in_bytes,
      "temp": stats.temp_size_in_bytes,
      "alias": stats.alias_size_in_bytes,
  }
  parts["total"] = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
  return parts


def time_calls(compiled, arg_sets, warmup: int, reps: int) -> list[float]:
  """Seconds per call, host clock around block_until_ready, rotating inputs."""
  for i in range(warmup):
    jax.block_until_ready(compiled(*arg_sets[i % len(arg_sets)]))
  seconds = []
  for i in range(reps):
    args = arg_sets[i % len(arg_sets)]
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - start)
  return seconds


def timing_summary(seconds: list[float]) -> dict:
  median = statistics.median(seconds)
  q1, _, q3 = np.percentile(seconds, [25, 50, 75])
  return {
      "median_ms": 1e3 * median,
      "min_ms": 1e3 * min(seconds),
      "iqr_pct": 100.0 * (q3 - q1) / median,
      "reps": len(seconds),
  }


def relative_error(x, ref) -> float:
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def error_problem(problem: Problem, budget_bytes: int) -> tuple[Problem, int]:
  """(problem at batch 1 and <= 2 heads, rows m that the reference keeps).

  The float32 reference (with its vjp) holds about 8 [heads, m, N] float32
  arrays; m, a power of two <= N, is the most rows that fit the budget.
  """
  heads = min(problem.num_heads, 2)
  small = dataclasses.replace(problem, batch=1, num_heads=heads)
  per_row = 8 * 4 * heads * problem.seq_len
  rows = problem.seq_len
  while rows > 1 and rows * per_row > budget_bytes:
    rows //= 2
  return small, rows


def reference_tail(q, k, v, ct, extra, rows: int, causal: bool, need_dq: bool,
                   variant: str = "none"):
  """float32 reference output (and dq) of the last `rows` query rows.

  With causal masks aligned bottom-right (`kernels.masking`), the last rows
  against all keys are exactly those rows of the full problem, and so is
  their dq (dq_i depends only on row i's cotangent).
  """
  kwargs = variant_cells.static_kwargs(variant, causal)

  def run(q, k, v, ct, extra):  # each [1, N, h, D]; out, dq: [1, rows, h, D] float32
    q, k, v, ct = (x.astype(jnp.float32) for x in (q, k, v, ct))
    extra = variant_cells.last_rows(variant_cells.cast(extra, jnp.float32), rows)
    f = lambda q_tail: reference_attention(q_tail, k, v, causal=causal, **kwargs,
                                           **extra)
    if not need_dq:
      return f(q[:, -rows:]), None
    out, vjp = jax.vjp(f, q[:, -rows:])
    return out, vjp(ct[:, -rows:])[0]

  return jax.jit(run)(q, k, v, ct, extra)


def implementation_tail(attn, q, k, v, ct, extra, rows: int, need_dq: bool):
  """The implementation's output (and dq) on the full problem, last rows kept."""
  def run(q, k, v, ct, extra):
    if not need_dq:
      return attn(q, k, v, extra), None
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, extra), q, k, v)
    return out, vjp(ct)[0]

  out, dq = jax.jit(run)(q, k, v, ct, extra)
  return out[:, -rows:], None if dq is None else dq[:, -rows:]


def measure_error(attn, problem: Problem, causal: bool, need_dq: bool,
                  seed: int, budget_bytes: int, ref_cache: dict,
                  variant: str = "none") -> dict:
  """Relative errors of out (and dq) against the float32 reference."""
  small, rows = error_problem(problem, budget_bytes)
  if not variant_cells.error_rows_ok(variant, rows, problem.seq_len):
    raise ValueError(f"the reference of all {problem.seq_len} rows exceeds"
                     " --ref_budget_mb, and dropout's bits follow absolute rows")
  q, k, v, ct = make_input_sets(small, 1, seed + 1)[0]
  extra = variant_cells.arrays(variant, small.shape, small.dtype, seed)
  key = (small, rows, causal, need_dq, variant)
  if key not in ref_cache:
    ref_cache[key] = reference_tail(q, k, v, ct, extra, rows, causal, need_dq,
                                    variant)
  out_ref, dq_ref = ref_cache[key]
  out, dq = implementation_tail(attn, q, k, v, ct, extra, rows, need_dq)
  return {
      "out": relative_error(out, out_ref),
      "dq": None if dq is None else relative_error(dq, dq_ref),
      "shape": list(small.shape),
      "rows": rows,
  }


def failure(exc: Exception) -> dict:
  """Why a cell could not run: out of memory, unsupported, or failed."""
  text = f"{type(exc).__name__}: {exc}".strip()
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
    status = "oom"
  elif isinstance(exc, (ValueError, NotImplementedError)):
    status = "unsupported"
  else:
    status = "failed"
  return {"status": status, "reason": text.splitlines()[0][:400]}


@dataclasses.dataclass(frozen=True)
class Settings:
  """How each cell is measured (flags of `kernels.bench.benchmark`)."""

  warmup: int
  reps: int
  seed: int
  errors: bool  # measure the error against the float32 reference
  ref_budget_bytes: int  # memory the float32 reference may use


def measure_cell(implementation: str, problem: Problem, causal: bool,
                 pass_: str, input_sets, settings: Settings,
                 ref_cache: dict, variant: str = "none") -> dict:
  """One cell: time, TFLOP/s, memory and error, or why it could not run."""
  flops = attention_flops(problem, causal, pass_, variant)
  cell = {
      "implementation": implementation, "label": label(implementation),
      "variant": variant, "pass": pass_, "causal": causal, "dtype": problem.dtype,
      "batch": problem.batch, "seq_len": problem.seq_len,
      "num_heads": problem.num_heads, "head_dim": problem.head_dim,
      "flops": flops,
  }
  try:
    attn = attention_fn(implementation, causal, variant)
    extra = variant_cells.arrays(variant, problem.shape, problem.dtype,
                                 settings.seed)
    arg_sets = [call_args(s, pass_, extra) for s in input_sets]
    compiled = pass_fn(attn, pass_).lower(*arg_sets[0]).compile()
    cell["memory_bytes"] = memory_bytes(compiled)
    seconds = time_calls(compiled, arg_sets, settings.warmup, settings.reps)
  except Exception as e:  # noqa: BLE001 - any failure becomes the cell's reason
    return cell | failure(e)
  cell |= timing_summary(seconds)
  cell["tflops"] = flops / (cell["median_ms"] * 1e-3) / 1e12
  cell["status"] = "ok"
  if settings.errors:
    try:
      cell["error"] = measure_error(
          attn, problem, causal, pass_ == "fwd+bwd", settings.seed,
          settings.ref_budget_bytes, ref_cache, variant)
    except Exception as e:  # noqa: BLE001
      cell["error"] = {"reason": failure(e)["reason"]}
  return cell
