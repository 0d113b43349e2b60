"""Labelled-data loading and classification batches."""

import json

import numpy as np
import pytest

from fusedlm.research.data.classification import (
    ClassificationBatches,
    LabeledExamples,
    load_labeled_examples,
    truncate_longest_first,
)
from fusedlm.research.data.tokenizer import Tokenizer


def test_csv_with_quoted_commas_and_numeric_labels(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text('sentence,score\n"good, really",10\nbad,2\nmeh,2\n')
  data = load_labeled_examples(path, text_field="sentence", label_field="score")
  assert data.texts == ["good, really", "bad", "meh"]
  assert data.label_names == ("2", "10")  # numeric, not string, order
  np.testing.assert_array_equal(data.labels, [1, 0, 0])
  assert data.label_to_id == {"2": 0, "10": 1}


def test_tsv_pairs_and_jsonl_share_a_label_vocabulary(tmp_path):
  (tmp_path / "train.tsv").write_text("a\tb\ty\nx1\tx2\tyes\nz1\tz2\tno\n")
  train = load_labeled_examples(tmp_path / "train.tsv", text_field="a", text_pair_field="b",
                                label_field="y")
  assert train.text_pairs == ["x2", "z2"] and train.label_names == ("no", "yes")
  (tmp_path / "dev.jsonl").write_text(json.dumps({"a": "q", "b": "r", "y": "yes"}) + "\n\n")
  dev = load_labeled_examples(tmp_path / "dev.jsonl", text_field="a", text_pair_field="b",
                              label_field="y", label_names=train.label_names)
  np.testing.assert_array_equal(dev.labels, [1])


@pytest.mark.parametrize("content, kwargs, error, message", [
    ("text,label\nhi,1\n", dict(label_field="y"), ValueError,
     r"d.csv:2: missing field 'y'; fields present: \['label', 'text'\]"),
    ("text,label\nhi,maybe\n", dict(label_names=["no", "yes"]), ValueError,
     r"d.csv:2: label 'maybe' is not one of \['no', 'yes'\]"),
    ("text,label\n", {}, ValueError, "holds no records"),
])
def test_bad_labelled_files_are_located(tmp_path, content, kwargs, error, message):
  (tmp_path / "d.csv").write_text(content)
  with pytest.raises(error, match=message):
    load_labeled_examples(tmp_path / "d.csv", **kwargs)


def test_unknown_format_and_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    load_labeled_examples(tmp_path / "nope.csv")
  (tmp_path / "d.xml").write_text("<x/>")
  with pytest.raises(ValueError, match="d.xml"):
    load_labeled_examples(tmp_path / "d.xml")


@pytest.mark.parametrize("a, b, budget, expected", [
    (3, 4, 10, (3, 4)), (20, 2, 10, (8, 2)), (2, 20, 10, (2, 8)), (9, 8, 10, (5, 5)),
    (30, 0, 7, (7, 0)),
])
def test_truncation_trims_the_longer_text_first(a, b, budget, expected):
  assert truncate_longest_first(a, b, budget) == expected


def examples(n=10, pairs=False):
  texts = [f"example number {i} " + "word " * i for i in range(n)]
  return LabeledExamples(texts=texts, labels=np.arange(n, dtype=np.int32) % 3,
                         label_names=("a", "b", "c"),
                         text_pairs=[f"second {i}" for i in range(n)] if pairs else None)


def test_rows_are_framed_truncated_and_padded(wordpiece):
  data = examples()
  batches = ClassificationBatches(data, wordpiece, seq_len=12, batch_size=5, seed=0)
  batch = next(batches.eval_batches())
  for row in range(5):
    ids = wordpiece.encode(data.texts[row])[:10]
    expected = [wordpiece.cls_id, *ids, wordpiece.sep_id]
    np.testing.assert_array_equal(batch["input_ids"][row, :len(expected)], expected)
    np.testing.assert_array_equal(batch["padding_mask"][row], np.arange(12) < len(expected))
    np.testing.assert_array_equal(batch["input_ids"][row, len(expected):], wordpiece.pad_id)
  np.testing.assert_array_equal(batch["labels"], data.labels[:5])
  assert (batch["token_type_ids"] == 0).all() and batches.num_labels == 3


def test_pairs_get_token_type_one_and_gpt_style_framing(bpe):
  data = examples(pairs=True)
  batch = ClassificationBatches(data, bpe, seq_len=40, batch_size=2, seed=0)._rows(
      np.array([4]), np.ones(1, dtype=np.float32))
  a, b = bpe.encode(data.texts[4]), bpe.encode(data.text_pairs[4])
  expected = [*a, bpe.eos_id, *b, bpe.eos_id]
  np.testing.assert_array_equal(batch["input_ids"][0, :len(expected)], expected)
  np.testing.assert_array_equal(batch["token_type_ids"][0, :len(expected)],
                                [0] * (len(a) + 1) + [1] * (len(b) + 1))


def test_order_resume_sharding_and_eval_padding(wordpiece):
  data = examples(10)
  make = lambda **kw: ClassificationBatches(data, wordpiece, seq_len=16, batch_size=4,
                                            seed=1, **kw)
  run = make()
  assert run.steps_per_epoch == 2
  epoch = np.concatenate([run.batch(s)["labels"] for s in range(2)])
  assert len(epoch) == 8
  halves = [make(process_index=p, process_count=2) for p in range(2)]
  for key, value in run.batch(5).items():
    np.testing.assert_array_equal(np.concatenate([h.batch(5)[key] for h in halves]), value)
    np.testing.assert_array_equal(make().batch(5)[key], value)
  evals = list(run.eval_batches())
  np.testing.assert_array_equal(np.concatenate([b["weights"] for b in evals]),
                                [1] * 10 + [0] * 2)
  np.testing.assert_array_equal(np.concatenate([b["labels"] for b in evals])[:10], data.labels)


def test_requirements_are_checked(wordpiece, bpe):
  with pytest.raises(ValueError, match="seq_len 4 is too short: 3 special tokens"):
    ClassificationBatches(examples(pairs=True), wordpiece, seq_len=4, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="neither \\[CLS\\]/\\[SEP\\] nor an end-of-text"):
    ClassificationBatches(examples(), Tokenizer(bpe.hf, "bpe", {}), seq_len=8, batch_size=2,
                          seed=0)
