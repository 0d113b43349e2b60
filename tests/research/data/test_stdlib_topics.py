"""The built-in labelled task: labels by package, no label leak, a stable split."""

import numpy as np

from fusedlm.research.data import stdlib_topics
from fusedlm.research.data.classification import LabeledExamples, split_examples


def test_labels_follow_the_package():
  assert stdlib_topics.topic_of("asyncio.streams") == "concurrency"
  assert stdlib_topics.topic_of("email.mime.text") == "email"
  assert stdlib_topics.topic_of("xml.etree.ElementTree") == "xml"
  assert stdlib_topics.topic_of("json.decoder") is None


def test_split_is_disjoint_balanced_enough_and_stable():
  train, validation = stdlib_topics.stdlib_topics()
  again_train, again_validation = stdlib_topics.stdlib_topics()
  assert train.texts == again_train.texts and validation.texts == again_validation.texts
  assert not set(train.texts) & set(validation.texts)
  assert train.label_names == validation.label_names == stdlib_topics.LABEL_NAMES
  for part in (train, validation):
    counts = np.bincount(part.labels, minlength=5)
    assert (counts > 0).all()
    assert counts.max() / counts.sum() < 0.4  # the chance level stays well below 50%
  total = len(train) + len(validation)
  assert 1000 < total < 3000
  assert 0.15 < len(validation) / total < 0.25


def test_texts_do_not_carry_the_qualified_name_or_repeat():
  texts = [text for text, _ in stdlib_topics.labelled_docstrings()]
  assert len(texts) == len(set(texts))
  assert all(len(text) >= stdlib_topics.MIN_CHARS for text in texts)
  # research.data.stdlib_corpus prefixes "asyncio.streams.StreamReader\n"; the task must not.
  assert not any(text.split("\n", 1)[0].startswith(("asyncio.", "email.", "xml."))
                 and " " not in text.split("\n", 1)[0] for text in texts)


def test_split_examples_needs_both_parts():
  examples = LabeledExamples(texts=["a", "b"], labels=np.array([0, 1], np.int32),
                             label_names=("x", "y"))
  try:
    split_examples(examples, 0.01, "tiny.csv")
  except ValueError as e:
    assert "empty validation part" in str(e) and "tiny.csv" in str(e)
  else:
    raise AssertionError("an empty validation part must be refused")
