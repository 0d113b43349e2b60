"""The attention benchmark end to end, at smoke size: cells, JSON, PNG, table.

No assertion is about a time: on CPU the Pallas kernel runs in the
interpreter, so the times only show that the measuring path works.
"""

import contextlib
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from fusedlm.kernels import reference_attention
from fusedlm.kernels.bench import benchmark, variant_cells
from fusedlm.kernels.bench import measure as bench_measure
from fusedlm.kernels.bench import report as bench_report
from tests.commands import fusedlm

# Relative Frobenius error of float32 inputs against the float32 reference:
# the kernel and the reference differ only in summation order.
FLOAT32_TOLERANCE = 1e-5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """One smoke sweep (pallas, xla, cudnn; fwd and fwd+bwd; causal on and off).

  Returns (the JSON, the stdout table, the output directory).
  """
  out = tmp_path_factory.mktemp("bench")
  argv = ["--smoke", "--seq_lens=128", "--head_dims=64", "--dtype=float32",
          "--impls=pallas,xla,cudnn", "--passes=fwd,fwd+bwd", "--causal=both",
          "--reps=2", f"--out={out}"]
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    benchmark.run(_parse(argv), argv)
  with open(out / benchmark.JSON_NAME) as f:
    return json.load(f), stdout.getvalue(), out


def _parse(argv):
  flag_values = flags.FlagValues()
  benchmark.define_flags(flag_values)
  flag_values(["kernels.bench.benchmark", *argv])
  return flag_values


def _cells(data, implementation):
  return [c for c in data["cells"] if c["implementation"] == implementation]


def test_every_cell_is_present(results):
  data, _, _ = results
  got = sorted((c["implementation"], c["pass"], c["causal"]) for c in data["cells"])
  want = sorted((i, p, c) for i in ("pallas", "xla", "cudnn")
                for p in ("fwd", "fwd+bwd") for c in (False, True))
  assert got == want


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_cells_have_time_flops_memory_and_error(results, implementation):
  data, _, _ = results
  for cell in _cells(data, implementation):
    assert cell["status"] == "ok", cell
    assert cell["median_ms"] > 0 and cell["tflops"] > 0
    assert cell["memory_bytes"]["total"] > 0
    np.testing.assert_array_less(cell["error"]["out"], FLOAT32_TOLERANCE)
    if cell["pass"] == "fwd+bwd":
      np.testing.assert_array_less(cell["error"]["dq"], FLOAT32_TOLERANCE)
    else:
      assert cell["error"]["dq"] is None
    assert math.isfinite(cell["pallas_ratio"])


def test_pallas_is_labelled_interpreted_off_gpu(results):
  data, _, _ = results
  labels = {c["label"] for c in _cells(data, "pallas")}
  assert labels == {"pallas" if ON_GPU else "pallas (interpret)"}
  assert data["meta"]["pallas_interpreted"] is not ON_GPU


def test_unavailable_implementation_gives_a_reason(results):
  # cuDNN needs a GPU, and takes no float32 even there.
  data, _, _ = results
  for cell in _cells(data, "cudnn"):
    assert cell["status"] == "unsupported"
    assert "cudnn" in cell["reason"]
    assert cell["pallas_ratio"] is None


def test_metadata(results):
  data, _, _ = results
  meta = data["meta"]
  for key in ("device_kind", "jax_version", "date", "command", "flop_formula",
              "memory_measure"):
    assert meta[key], key
  assert meta["jax_version"] == jax.__version__
  assert meta["command"].startswith("fusedlm bench-attention --smoke")


def test_a_finished_sweep_says_so_in_its_json(results):
  data, _, _ = results
  assert data["meta"]["complete"] is True


def test_a_killed_sweep_leaves_the_cells_it_measured(tmp_path, monkeypatch):
  # A sweep stopped by a time limit after two cells (the first H200 run lost
  # a whole sweep's JSON so): the JSON holds those two, marked incomplete.
  measured = bench_measure.measure_cell
  calls = []

  def measure_two(*args, **kwargs):
    if len(calls) == 2:
      raise KeyboardInterrupt  # the kill: what is on disk by now is what stays
    calls.append(None)
    return measured(*args, **kwargs)

  monkeypatch.setattr(bench_measure, "measure_cell", measure_two)
  argv = ["--smoke", "--seq_lens=128,256", "--head_dims=64", "--dtype=float32",
          "--impls=xla", "--passes=fwd", "--causal=both", "--reps=1",
          "--warmup=0", "--no_errors", f"--out={tmp_path}"]
  with pytest.raises(KeyboardInterrupt), contextlib.redirect_stdout(io.StringIO()):
    benchmark.run(_parse(argv), argv)
  with open(tmp_path / benchmark.JSON_NAME) as f:
    data = json.load(f)
  assert data["meta"]["complete"] is False
  assert [(c["seq_len"], c["causal"]) for c in data["cells"]] == [
      (128, False), (128, True)]
  assert all(c["status"] == "ok" for c in data["cells"])
  assert not (tmp_path / f"{benchmark.JSON_NAME}.tmp").exists()


def test_png_is_written(results):
  _, _, out = results
  with open(out / benchmark.PNG_NAME, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE


def test_table_shows_ratio_and_short_reasons(results):
  data, table, _ = results
  assert bench_report.RATIO_COLUMN in table
  assert "1.00" in table  # pallas against itself
  # An unsupported cell is a few words in the table, the whole reason in the JSON.
  cudnn_rows = [line for line in table.splitlines() if "  cudnn  " in line]
  assert len(cudnn_rows) == 4
  for row in cudnn_rows:
    assert row.endswith("unsupported: implementation='cudnn' needs an NVIDIA GPU"), row
  assert "ValueError" not in table
  reasons = {c["reason"] for c in _cells(data, "cudnn")}
  assert all(r.startswith("ValueError: implementation='cudnn' needs") for r in reasons)


def test_short_reason_keeps_the_first_clause():
  assert bench_report.short_reason(
      "ValueError: implementation='mosaic' runs on Hopper GPUs; on the 'cpu' backend use"
      " 'pallas' or 'xla'.") == "implementation='mosaic' runs on Hopper GPUs"
  assert len(bench_report.short_reason("RuntimeError: " + "x" * 300)) == 60


def test_flop_count():
  problem = bench_measure.Problem(batch=2, seq_len=128, num_heads=3,
                                  head_dim=64, dtype="bfloat16")
  forward = 4 * 2 * 3 * 128 * 128 * 64
  assert bench_measure.attention_flops(problem, False, "fwd") == forward
  assert bench_measure.attention_flops(problem, True, "fwd") == forward / 2
  assert bench_measure.attention_flops(problem, True, "fwd+bwd") == 3.5 * forward / 2


def test_out_of_memory_is_classified():
  error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 17GiB")
  assert bench_measure.failure(error)["status"] == "oom"
  assert bench_measure.failure(ValueError("bad shape"))["status"] == "unsupported"


def test_error_rows_fit_the_budget():
  problem = bench_measure.Problem(batch=4, seq_len=4096, num_heads=16,
                                  head_dim=128, dtype="bfloat16")
  small, rows = bench_measure.error_problem(problem, budget_bytes=2**26)
  assert small.shape == (1, 4096, 2, 128)
  assert rows == 256  # 256 rows * 8 arrays * 4 bytes * 2 heads * 4096 = 2**26


@pytest.mark.parametrize("causal", [False, True])
def test_reference_tail_equals_the_full_problem_rows(causal):
  # The error measure keeps the last rows only; with bottom-right causal
  # alignment they must match the same rows of the full problem, dq included.
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, ct = (jax.random.normal(key, (1, 64, 2, 16)) for key in keys)
  out_tail, dq_tail = bench_measure.reference_tail(q, k, v, ct, {}, 16, causal, True)
  f = lambda q: reference_attention(q, k, v, causal=causal)
  out, vjp = jax.vjp(f, q)
  (dq,) = vjp(ct)
  np.testing.assert_allclose(out_tail, out[:, -16:], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dq_tail, dq[:, -16:], rtol=1e-5, atol=1e-6)
  assert out_tail.dtype == jnp.float32


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match=r"--impls: unknown fast; choose from pallas"):
    benchmark.resolve(_parse(["--impls=pallas,fast"]))


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
  done = fusedlm("bench-attention", "--seq_lens=128,x", f"--out={tmp_path}", timeout=120)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip().splitlines() == [
      "fusedlm bench-attention: error: --seq_lens takes a comma list of integers,"
      " got '128,x'."]
  assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def variant_results(tmp_path_factory):
  """A smoke sweep of the variant cells (causal fwd+bwd; pallas, xla, cudnn)."""
  out = tmp_path_factory.mktemp("bench_variants")
  argv = ["--smoke", "--seq_lens=128", "--head_dims=64", "--dtype=float32",
          "--impls=pallas,xla,cudnn", "--passes=fwd+bwd", "--causal=on",
          "--variants=dropout,window,softcap,bias", "--reps=1", "--warmup=0",
          f"--out={out}"]
  with contextlib.redirect_stdout(io.StringIO()) as stdout:
    benchmark.run(_parse(argv), argv)
  with open(out / benchmark.JSON_NAME) as f:
    return json.load(f), stdout.getvalue()


def test_variant_cells_run_and_match_the_reference(variant_results):
  data, table = variant_results
  cells = {(c["implementation"], c["variant"]): c for c in data["cells"]}
  assert sorted(cells) == sorted(
      (i, v) for i in ("pallas", "xla", "cudnn")
      for v in ("dropout", "window", "softcap", "bias"))
  for variant in ("dropout", "window", "softcap", "bias"):
    assert f"| {variant} ==" in table
    for implementation in ("pallas", "xla"):
      cell = cells[implementation, variant]
      assert cell["status"] == "ok", cell
      # Dropout too: the kernel draws the reference's bits.
      np.testing.assert_array_less(cell["error"]["out"], FLOAT32_TOLERANCE)
      np.testing.assert_array_less(cell["error"]["dq"], FLOAT32_TOLERANCE)
    # cuDNN: no GPU here (and no dropout or soft-cap through jax.nn anywhere).
    assert cells["cudnn", variant]["status"] == "unsupported"
  # The window's band has fewer pairs than causal attention, and the FLOPs say so.
  assert cells["pallas", "window"]["flops"] == cells["pallas", "bias"]["flops"]
  # (at N = 128 the 1024-key window covers every row: causal's pairs)


def test_window_flops_count_the_band():
  n, w = 4096, variant_cells.WINDOW
  rows, cols = np.arange(n)[:, None], np.arange(n)[None, :]
  band = (cols >= rows - w)
  assert variant_cells.visible_pairs("window", True, n) == np.sum(band & (cols <= rows))
  assert variant_cells.visible_pairs("window", False, n) == np.sum(band & (cols <= rows + w))
  assert variant_cells.visible_pairs("none", True, n) == n * n / 2


def test_mosaic_configurations_are_implementations():
  sweep = benchmark.resolve(_parse(["--impls=mosaic,mosaic:num_stages=3+block_kv=64"]))
  assert sweep["implementations"] == ("mosaic", "mosaic:num_stages=3+block_kv=64")
  blocks = bench_measure.mosaic_blocks("mosaic:num_stages=3+block_kv=64")
  assert (blocks.num_stages, blocks.block_kv) == (3, 64)
  with pytest.raises(ValueError, match="mosaic:bogus=1.*bogus"):
    benchmark.resolve(_parse(["--impls=mosaic:bogus=1"]))
  with pytest.raises(ValueError, match="--variants: unknown gelu"):
    benchmark.resolve(_parse(["--variants=none,gelu"]))


def test_tpu_kernel_is_a_cell(tmp_path):
  # --impls=tpu: the TPU kernel's cell (interpreted off TPU, and labelled so),
  # checked against the float32 reference like every other.
  argv = ["--smoke", "--seq_lens=128", "--head_dims=64", "--dtype=float32",
          "--impls=tpu", "--passes=fwd+bwd", "--causal=on", "--reps=1",
          "--warmup=0", f"--out={tmp_path}"]
  with contextlib.redirect_stdout(io.StringIO()):
    benchmark.run(_parse(argv), argv)
  with open(tmp_path / benchmark.JSON_NAME) as f:
    (cell,) = json.load(f)["cells"]
  assert cell["status"] == "ok", cell
  interpreted = jax.default_backend() != "tpu"
  assert cell["label"] == ("tpu (interpret)" if interpreted else "tpu")
  assert cell["error"]["out"] < 1e-5 and cell["error"]["dq"] < 1e-5, cell["error"]
