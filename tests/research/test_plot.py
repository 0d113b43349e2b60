"""Metric plots: a PNG for causal and MLM + NSP runs, resumed and classification
logs, missing or empty logs, the CLI."""

import json
from pathlib import Path

import pytest

from fusedlm.research.plot import plot_run
from tests.commands import fusedlm

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path):
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE)
  assert len(data) > 10_000  # axes, curves and labels, not a blank canvas


def test_causal_run(trained_gpt, tmp_path):
  out = plot_run(trained_gpt, tmp_path / "deep" / "gpt.png")
  assert out == tmp_path / "deep" / "gpt.png"
  assert_png(out)


def test_mlm_nsp_run_default_path(trained_bert):
  out = plot_run(trained_bert)
  assert out == trained_bert / "plots" / "metrics.png"
  assert_png(out)


def test_resumed_classification_log(tmp_path):
  rows = [
      {"step": 10, "split": "train", "loss": 1.0, "accuracy": 0.5, "tokens": 8.0,
       "learning_rate": 1e-3, "tokens_per_second": 100.0, "mfu": 0.1},
      {"step": 20, "split": "train", "loss": 0.9, "accuracy": 0.6, "tokens": 8.0,
       "learning_rate": 1e-3, "tokens_per_second": 120.0, "mfu": 0.12},
      # Resumed from step 10: step 20 logged again.
      {"step": 20, "split": "train", "loss": 0.8, "accuracy": 0.7, "tokens": 8.0,
       "learning_rate": 1e-3, "tokens_per_second": 110.0, "mfu": 0.11},
      {"step": 20, "split": "eval", "loss": 0.85, "accuracy": 0.65, "tokens": 32.0,
       "macro_f1": 0.6},
  ]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert_png(plot_run(tmp_path))


def test_missing_metrics(tmp_path):
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl at .*metrics.jsonl"):
    plot_run(tmp_path)


def test_empty_metrics(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="metrics.jsonl has no train or eval rows"):
    plot_run(tmp_path)


def test_a_half_written_last_row_is_skipped_and_a_bad_line_named(tmp_path):
  row = '{"step": 1, "split": "train", "loss": 2.0}\n'
  (tmp_path / "metrics.jsonl").write_text(row + '{"step": 2, "split": "train", "lo')
  assert_png(plot_run(tmp_path))
  (tmp_path / "metrics.jsonl").write_text('{"step": 2, "spl\n' + row)
  with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON row"):
    plot_run(tmp_path)


def test_cli(trained_gpt, tmp_path):
  out = tmp_path / "cli.png"
  done = fusedlm("plot", "--workdir", trained_gpt, "--out", out)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == str(out)
  assert_png(out)

  bad = fusedlm("plot", "--workdir", tmp_path / "nothing")
  assert bad.returncode == 2
  assert "no metrics.jsonl at" in bad.stderr and "Traceback" not in bad.stderr
