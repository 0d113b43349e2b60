"""One cached decoding step's attention (q_len 1 against a long cache), per implementation.

  python benchmarks/decode_attention.py --output benchmarks/h200/decode_attention.json
  python benchmarks/decode_attention.py --smoke          # a CPU dry run: tiny sizes

What `Decoder.decode_step` asks of `kernels.dot_product_attention` at every
generated token: q [batch, 1, heads, head_dim] against a cache of `cache`
slots with the unfilled ones hidden by a key padding mask (half filled
here), bfloat16. Each implementation is jitted alone and timed per call
(block_until_ready after each, as a decoding loop waits for its token);
the median of --reps calls after --warmup. "mosaic" takes its decoding path
(kernels.mosaic.decode: XLA) at q_len <= 16; issue 24 asks that it be no
slower than the Triton kernel ("pallas") there. An implementation that
cannot run here (mosaic off a Hopper GPU) gets its reason instead of a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from fusedlm.kernels import dot_product_attention, target

IMPLEMENTATIONS = ("mosaic", "pallas", "xla", "cudnn")
GPU_CASES = [dict(batch=b, heads=12, head_dim=64, cache=c) for b in (1, 8) for c in (1024, 4096)]
SMOKE_CASES = [dict(batch=2, heads=2, head_dim=64, cache=128)]


def time_case(implementation: str, batch: int, heads: int, head_dim: int, cache: int,
              warmup: int, reps: int) -> dict:
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, 1, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, cache, heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, cache, heads, head_dim), jnp.bfloat16)
  filled = jnp.arange(cache)[None, :] < cache // 2  # slots written so far
  mask = jnp.broadcast_to(filled, (batch, cache))
  step = jax.jit(lambda q, k, v, mask: dot_product_attention(
      q, k, v, key_padding_mask=mask, implementation=implementation))
  row = dict(implementation=implementation, batch=batch, heads=heads, head_dim=head_dim,
             cache=cache)
  try:
    reference = dot_product_attention(q, k, v, key_padding_mask=mask, implementation="xla")
    out = step(q, k, v, mask)
    row["max_abs_error_vs_xla"] = float(jnp.max(jnp.abs(
        out.astype(jnp.float32) - reference.astype(jnp.float32))))
    for _ in range(warmup):
      step(q, k, v, mask).block_until_ready()
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      step(q, k, v, mask).block_until_ready()
      times.append(time.perf_counter() - start)
    row["us_per_call"] = statistics.median(times) * 1e6
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU dry run)")
  parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--reps", type=int, default=100)
  parser.add_argument("--output", default=None, help="JSON file of the rows")
  args = parser.parse_args()
  cases = SMOKE_CASES if args.smoke else GPU_CASES
  rows = [time_case(impl, **case, warmup=args.warmup, reps=args.reps)
          for case in cases for impl in args.impls.split(",")]
  device = target.describe(jax.devices()[0])
  print(f"decoding-step attention on {device}, jax {jax.__version__}: q_len 1, bfloat16,"
        " half the cache filled; median us per call")
  print(f"{'batch':>5} {'heads':>5} {'cache':>6} {'implementation':<10} {'us/call':>9}"
        f" {'vs pallas':>9}  error vs xla / why not")
  for row in rows:
    pallas = next((r.get("us_per_call") for r in rows if r["implementation"] == "pallas"
                   and r["cache"] == row["cache"] and r["batch"] == row["batch"]), None)
    us = row.get("us_per_call")
    ratio = f"{pallas / us:.2f}x" if us and pallas else "-"
    note = row.get("error") or f"{row['max_abs_error_vs_xla']:.1e}"
    print(f"{row['batch']:>5} {row['heads']:>5} {row['cache']:>6} {row['implementation']:<10}"
          f" {'-' if us is None else f'{us:.1f}':>9} {ratio:>9}  {note}")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=2)
    print(f"written to {args.output}")


if __name__ == "__main__":
  main()
