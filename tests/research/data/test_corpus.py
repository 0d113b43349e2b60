"""Corpus fingerprints and the hash-based train/validation split."""

import numpy as np
import pytest

from research.data.corpus import Corpus, corpus_from_documents, split_documents


def docs(n):
  return [f"document number {i}\nwith two lines" for i in range(n)]


def test_fingerprint_depends_on_content_and_split_boundaries():
  base = Corpus("a", ["ab", "c"], ["d"])
  assert base.fingerprint == Corpus("other name", ["ab", "c"], ["d"]).fingerprint
  changed = [Corpus("a", ["a", "bc"], ["d"]), Corpus("a", ["ab"], ["c", "d"]),
             Corpus("a", ["c", "ab"], ["d"]), Corpus("a", ["ab", "c"], ["e"])]
  assert len({base.fingerprint} | {c.fingerprint for c in changed}) == 5


def test_split_is_deterministic_order_independent_and_near_the_fraction():
  all_docs = docs(4000)
  train, validation = split_documents(all_docs, 0.1)
  assert sorted(train + validation) == sorted(all_docs)
  # Binomial(4000, 0.1): sd = 19, so 5 sd is 95.
  np.testing.assert_allclose(len(validation), 400, atol=95)
  train2, validation2 = split_documents(all_docs[::-1], 0.1)
  assert set(validation2) == set(validation)
  assert train == [d for d in all_docs if d in set(train)]


def test_duplicates_land_on_the_same_side():
  train, validation = split_documents(docs(200) * 3, 0.2)
  assert not set(train) & set(validation)


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_both_parts_stay_non_empty(fraction):
  train, validation = split_documents(docs(5), fraction)
  assert train and validation
  assert len(train) + len(validation) == 5


def test_a_single_document_is_cut_at_a_line_break():
  text = "".join(f"line {i}\n" for i in range(100))
  (head,), (tail,) = split_documents([text], 0.1)
  assert head + tail == text
  assert head.endswith("\n")
  np.testing.assert_allclose(len(tail) / len(text), 0.1, atol=0.02)


def test_empty_corpus_is_rejected_with_its_name():
  with pytest.raises(ValueError, match=r"corpus 'mine' is empty.*from here"):
    corpus_from_documents("mine", ["", "  \n"], source="here")


def test_explicit_validation_documents_are_used_as_given():
  corpus = corpus_from_documents("c", ["a", "b"], validation_docs=["v", " "])
  assert (corpus.train, corpus.validation) == (["a", "b"], ["v"])
  with pytest.raises(ValueError, match="empty validation"):
    corpus_from_documents("c", ["a"], validation_docs=[""])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_fraction_outside_unit_interval_is_rejected(fraction):
  with pytest.raises(ValueError, match=str(fraction)):
    split_documents(docs(3), fraction)


def test_unknown_split_name_is_rejected():
  with pytest.raises(ValueError, match="'test'"):
    Corpus("c", ["a"], ["b"]).split("test")
