"""Extractive QA end to end: fine-tune a tiny BERT on a SQuAD file, evaluate it
(exact match, F1, predictions.json) from the checkpoint and the command line,
the built-in task and its baselines, and one-line errors for bad files."""

import json

import pytest

from fusedlm.research import finetune, run_config
from fusedlm.research.data import stdlib_qa
from fusedlm.research.objectives import qa
from fusedlm.research.training import eval_loop
from tests.commands import fusedlm
from tests.research.conftest import load_experiment
from tests.research.data.test_squad import ANSWERS, sample_file


def test_smoke_finetune_evaluate_and_predictions(trained_bert, tmp_path):
  """:runlocal's settings, a few steps from the shared tiny BERT (byte tokenizer)."""
  path = sample_file(tmp_path / "train.json")
  config = load_experiment("finetune_qa", run_config.RUNLOCAL)
  config.data.update(task=str(path), validation=str(path))
  config.train.update(steps=4, eval_every=4, eval_batches=0)
  config.checkpoint.every = 4
  result = finetune.finetune(config, tmp_path / "run", str(trained_bert), progress=False)
  assert result["model"].span_head and not result["model"].mlm
  assert result["transfer"].fresh == ("['span_head']['bias']", "['span_head']['kernel']")
  record = eval_loop.evaluate_run(tmp_path / "run", num_devices=2, batch_size=4)
  metrics = record["metrics"]
  assert metrics["tokens"] == result["eval"]["tokens"]  # windows, however batched
  assert metrics["questions"] == len(ANSWERS) and metrics["NoAns_total"] == 1
  assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 100.0
  predictions = record["outputs"]["predictions"]
  assert sorted(predictions) == sorted(f"q{i}" for i in range(len(ANSWERS)))
  out = fusedlm("evaluate", "--workdir", tmp_path / "run", "--data", path)
  assert out.returncode == 0, out.stderr
  assert "exact match" in out.stdout and "f1" in out.stdout
  eval_dir = tmp_path / "run" / "eval"
  files = sorted(p.name for p in eval_dir.iterdir())
  assert files == ["step_4-train.json.json", "step_4-train.json.null_odds.json",
                   "step_4-train.json.predictions.json"], files
  written = json.loads((eval_dir / "step_4-train.json.predictions.json").read_text())
  assert written == predictions  # the official format: {question id: answer text}
  # A bad file: one line naming the question, exit status 2.
  record_json = json.loads(path.read_text())
  record_json["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] = 0
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(record_json))
  out = fusedlm("evaluate", "--workdir", tmp_path / "run", "--data", bad)
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert "bad.json: question 'q4': the answer 'a min-heap' does not match" in out.stderr


def test_configs_and_refusals(trained_gpt, tmp_path):
  for arg in ("", run_config.RUNLOCAL):
    run_config.validate(load_experiment("finetune_qa", arg))
  config = run_config.finetune_defaults("qa")
  assert "text_field" not in config.data and config.decode.max_answer_len == 30
  config.data.doc_stride = 200
  with pytest.raises(ValueError, match=r"doc_stride \(200\) must be in \[1, 93\]"):
    run_config.validate(config)
  with pytest.raises(ValueError, match=r"start it from run_config.defaults\('seq2seq'\)"):
    run_config.finetune_defaults("seq2seq")
  config = load_experiment("finetune_qa", run_config.RUNLOCAL)
  config.data.update(task=str(sample_file(tmp_path / "s.json")), validation_fraction=0.9)
  with pytest.raises(ValueError, match="extractive QA needs a pretrained encoder"):
    finetune.finetune(config, tmp_path / "run", str(trained_gpt), progress=False)


def test_builtin_task_and_its_trivial_baselines():
  train, validation = stdlib_qa.stdlib_qa()
  assert len(train) > 15000 and len(validation) > 1500
  kinds = {}
  for q in validation.questions:
    kind = q.qid.rsplit(":", 1)[1]
    kinds[kind] = kinds.get(kind, 0) + 1
    for text, start in q.answers:
      assert q.context[start:start + len(text)] == text
    if not q.answerable:  # only a function's or class's card lacks a Class line
      assert kind == "class" and "\nClass: " not in q.context
  assert kinds == {k: len(validation) // 4 for k in ("module", "kind", "summary", "class")}
  baselines = qa.trivial_baselines(validation)
  # The README's floors: no answer EM = the unanswerable share; the first field
  # is right for about one question in five.
  unanswerable = sum(not q.answerable for q in validation.questions) / len(validation)
  assert baselines["no_answer"]["exact_match"] == pytest.approx(100 * unanswerable)
  assert 15.0 < baselines["first_field"]["exact_match"] < 30.0
