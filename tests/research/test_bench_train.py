"""fusedlm bench-train on CPU: the table and the JSON, one row per implementation and the reference.

A smoke run of the synthetic tiny GPT (runlocal: 2 blocks of width 64,
float32, byte tokenizer) for 1 warm-up and 2 timed steps: the figures are
checked for consistency with each other, not for speed. "mosaic" cannot run
on a CPU (nor in float32): its row carries the reason and the others still run.
"""

import json

import pytest

from fusedlm.kernels import IMPLEMENTATIONS
from fusedlm.kernels.bench import mosaic_compile
from tests.commands import fusedlm
from tests.research.conftest import ROOT

CONFIG = f"{ROOT / 'experiments' / 'tiny_gpt_synthetic.py'}:runlocal"


def test_smoke_run_writes_rows_for_each_implementation_and_the_reference(tmp_path):
  output = tmp_path / "out" / "bench.json"
  done = fusedlm("bench-train", f"--config={CONFIG}", "--batch_size=4", "--seq_len=32",
                 "--impls=xla,mosaic", "--warmup_steps=1", "--timed_steps=2",
                 f"--config.data.cache_dir={tmp_path / 'cache'}", f"--output={output}")
  assert done.returncode == 0, done.stderr
  result = json.loads(output.read_text())
  assert result["config"].endswith("tiny_gpt_synthetic.py:runlocal")
  assert (result["batch_size"], result["seq_len"], result["tokens_per_step"]) == (4, 32, 128)
  assert result["peak_flops"] is None  # a CPU: no MFU
  reference, xla, mosaic = result["rows"]
  assert [row["implementation"] for row in result["rows"]] == [
      "reference (xla)", "xla", "mosaic"]
  assert [row["reference"] for row in result["rows"]] == [True, False, False]
  for row in (reference, xla):
    assert row["error"] is None
    assert row["ms_per_step"] > 0 and row["memory_bytes"] > 0 and row["mfu"] is None
    assert row["tokens_per_second"] == pytest.approx(128 / (row["ms_per_step"] / 1e3))
    assert 0 < row["loss"] < 10
  assert xla["vs_reference"] == pytest.approx(
      xla["tokens_per_second"] / reference["tokens_per_second"])
  assert xla["attention"] == [
      "  self-attention x2 (q_len 32, kv_len 32): xla (requested)"
      " [transformer/layer_0/attention .. transformer/layer_1/attention]"]
  assert mosaic["ms_per_step"] is None and "bfloat16 or float16" in mosaic["error"]
  table = done.stdout.splitlines()
  assert table[2].split()[:3] == ["implementation", "ms/step", "tokens/s"]
  assert table[3].startswith("reference (xla) *") and table[5].startswith("mosaic")
  assert f"written to {output}" in done.stdout


def test_an_unknown_implementation_is_one_line(tmp_path):
  done = fusedlm("bench-train", f"--config={CONFIG}", "--impls=flash", "--output",
                 tmp_path / "x.json")
  assert done.returncode == 2
  assert done.stderr.strip() == (
      "fusedlm bench-train: error: --impls: unknown implementation(s) ['flash'];"
      f" choose from {', '.join(IMPLEMENTATIONS)}.")


def test_compile_for_h100_states_each_steps_compiled_memory(tmp_path):
  """Compiled for a compile-only H100 (JAX >= 0.11 with the CUDA plugin and
  ptxas: CI's second pass), nothing run: memory per row, no timings."""
  try:
    mosaic_compile.h100_device()
  except mosaic_compile.InspectError as e:
    pytest.skip(f"cannot compile for an H100 here: {e}")
  output = tmp_path / "bench.json"
  done = fusedlm("bench-train", f"--config={CONFIG}", "--batch_size=4", "--seq_len=64",
                 "--impls=mosaic,xla", "--compile_for=h100", "--config.model.dtype=bfloat16",
                 f"--config.data.cache_dir={tmp_path / 'cache'}", f"--output={output}")
  assert done.returncode == 0, done.stderr
  result = json.loads(output.read_text())
  assert result["compile_only"] and "H100" in result["device"] and result["host"] is None
  _, mosaic, xla = result["rows"]
  for row in (mosaic, xla):
    assert row["error"] is None and row["memory_bytes"] > 0, row
    assert row["ms_per_step"] is None and row["loss"] is None
  assert "mosaic (requested)" in mosaic["attention"][0]
  assert "compiled, not run" in done.stdout.splitlines()[0]


def test_dropping_a_field_the_batches_lack_is_one_line(tmp_path):
  done = fusedlm("bench-train", f"--config={CONFIG}", "--batch_size=4", "--seq_len=32",
                 "--impls=xla", "--drop_fields=mlm_positions",
                 f"--config.data.cache_dir={tmp_path / 'cache'}",
                 f"--output={tmp_path / 'x.json'}")
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert "cannot drop ['mlm_positions']: the causal batches hold" in done.stderr
  assert not (tmp_path / "x.json").exists()
