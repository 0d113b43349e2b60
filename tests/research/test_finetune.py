"""Fine-tuning: the built-in labelled task beats chance, the result reloads,
a user's CSV works end to end, parameter transfer, and clear errors."""

import csv
import json

import numpy as np
import pytest

from fusedlm.research import finetune
from fusedlm.research.runs.warm_start import transfer_params
from fusedlm.research.training import eval_loop, loop
from tests.research.conftest import load_experiment, tiny_bert_config


@pytest.fixture(scope="module")
def wordpiece_bert(tmp_path_factory, shared_cache_dir):
  """A tiny BERT briefly pretrained on the built-in corpus with a WordPiece tokenizer."""
  config = tiny_bert_config(shared_cache_dir, steps=40)
  config.data.update(corpus="builtin", tokenizer="wordpiece", vocab_size=2048)
  workdir = tmp_path_factory.mktemp("wordpiece_bert")
  loop.train(config, workdir, progress=False)
  return workdir


def topics_config(steps=300):
  config = load_experiment("finetune_topics")
  config.data.seq_len = 64
  config.train.steps = steps
  config.train.eval_every = steps
  config.optimizer.learning_rate = 5e-4  # post-LN BERT plateaus longer at 1e-3 and above
  config.model.dropout = 0.0
  return config


@pytest.mark.slow
def test_builtin_task_is_learned_and_the_result_reloads(wordpiece_bert, tmp_path):
  result = finetune.finetune(topics_config(), tmp_path, str(wordpiece_bert), progress=False)
  metrics = result["eval"]
  # Chance = always the largest class = 31% of the 351 held-out examples;
  # this run reached 53.6% (macro-F1 0.27) when written.
  assert metrics["tokens"] == 351
  assert metrics["accuracy"] > 0.45
  assert metrics["macro_f1"] > 0.2
  assert result["transfer"].fresh == ("['classifier']['dense']['bias']",
                                      "['classifier']['dense']['kernel']")
  assert "['nsp_head']['kernel']" in result["transfer"].unused
  reloaded = eval_loop.evaluate_run(tmp_path, num_devices=1)
  assert reloaded["label_names"] == ["concurrency", "email", "testing", "web", "xml"]
  for key in ("loss", "accuracy", "macro_f1"):
    assert reloaded["metrics"][key] == pytest.approx(metrics[key], rel=1e-5), key
  confusion = np.array(reloaded["metrics"]["confusion"])
  assert confusion.shape == (5, 5) and confusion.sum() == 351
  assert np.trace(confusion) / 351 == pytest.approx(metrics["accuracy"])
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["init_from"] == str(wordpiece_bert)


def _write_reviews(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["review", "stars"])
    writer.writerows(rows)


def _reviews(n, seed):
  rng = np.random.default_rng(seed)
  good = ["great", "lovely", "excellent", "wonderful"]
  bad = ["awful", "boring", "terrible", "dull"]
  rows = []
  for _ in range(n):
    label = int(rng.integers(2))
    word = rng.choice(good if label else bad)
    rows.append((f"the film was {word} and the cast {rng.choice(good + bad)}", label))
  return rows


def test_user_csv_with_the_decoder(trained_gpt, tmp_path):
  train_csv, test_csv = tmp_path / "train.csv", tmp_path / "test.csv"
  _write_reviews(train_csv, _reviews(64, 0))
  _write_reviews(test_csv, _reviews(32, 1))
  config = load_experiment("finetune_sentiment_csv")
  config.data.update(task=str(train_csv), validation=str(test_csv), text_field="review",
                     label_field="stars", seq_len=64)
  config.train.update(steps=4, batch_size=16, eval_every=4, log_every=2)
  config.checkpoint.every = 4
  out = finetune.finetune(config, tmp_path / "run", str(trained_gpt), progress=False)
  assert out["model"].kind == "decoder" and out["model"].num_labels == 2
  assert out["eval"]["tokens"] == 32
  again = eval_loop.evaluate_run(tmp_path / "run", data=str(test_csv))
  assert again["metrics"]["accuracy"] == pytest.approx(out["eval"]["accuracy"])
  _write_reviews(tmp_path / "odd.csv", [("fine", 7)])
  with pytest.raises(ValueError, match=r"odd.csv:2: label '7' is not one of \['0', '1'\]"):
    eval_loop.evaluate_run(tmp_path / "run", data=str(tmp_path / "odd.csv"))


def test_bad_inputs_are_named(trained_gpt, trained_bert, tmp_path):
  config = topics_config(steps=2)
  with pytest.raises(ValueError, match="pass --init_from DIR"):
    finetune.finetune(config, tmp_path / "a")
  with pytest.raises(FileNotFoundError, match="no run folder"):
    finetune.finetune(config, tmp_path / "a", str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="launch it with fusedlm finetune"):
    loop.train(topics_config(), tmp_path / "b", progress=False)
  empty = load_experiment("finetune_sentiment_csv")
  with pytest.raises(ValueError, match="config.data.task is empty"):
    finetune.finetune(empty, tmp_path / "c", str(trained_gpt), progress=False)
  missing = load_experiment("finetune_sentiment_csv")
  missing.data.task = str(tmp_path / "nope.csv")
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    finetune.finetune(missing, tmp_path / "d", str(trained_gpt), progress=False)
  reshaped = topics_config()
  with reshaped.unlocked():
    reshaped.model.hidden_size = 96
  with pytest.raises(ValueError, match=r"unknown keys in config.model: config.model.hidden_size"):
    finetune.finetune(reshaped, tmp_path / "e", str(trained_bert), progress=False)
  too_long = topics_config()
  too_long.data.seq_len = 128
  with pytest.raises(ValueError, match=r"seq_len \(128\) exceeds the pretrained model's"
                                       r" max_len \(64\)"):
    finetune.finetune(too_long, tmp_path / "f", str(trained_bert), progress=False)


def test_transfer_keeps_shared_leaves_and_reports_the_rest():
  pretrained = {"trunk": {"w": np.ones((2, 3), np.float32)}, "mlm_bias": np.zeros(4)}
  fresh = {"trunk": {"w": np.zeros((2, 3), np.float32)},
           "classifier": {"dense": {"kernel": np.full((3, 2), 0.5, np.float32)}}}
  params, report = transfer_params(pretrained, fresh)
  np.testing.assert_array_equal(params["trunk"]["w"], 1.0)
  np.testing.assert_array_equal(params["classifier"]["dense"]["kernel"], 0.5)
  assert report.kept == 1
  assert report.fresh == ("['classifier']['dense']['kernel']",)
  assert report.unused == ("['mlm_bias']",)
  # A pretrained classifier is retrained from scratch, whatever its shape.
  old_head = {**pretrained, "classifier": {"dense": {"kernel": np.ones((3, 5))}}}
  params, report = transfer_params(old_head, fresh)
  np.testing.assert_array_equal(params["classifier"]["dense"]["kernel"], 0.5)
  with pytest.raises(ValueError, match=r"\['trunk'\]\['w'\]: pretrained \(2, 4\), new \(2, 3\)"):
    transfer_params({"trunk": {"w": np.ones((2, 4))}}, fresh)
