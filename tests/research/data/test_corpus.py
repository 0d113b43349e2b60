"""Corpus fingerprints and the hash-based train/validation split."""

import numpy as np
import pytest

from fusedlm.research.data.corpus import (
    Corpus,
    corpus_from_documents,
    split_documents,
    split_paragraphs,
)


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


def paragraph_docs(n_docs, seed=0):
  """Documents of 1 to 60 paragraphs of 10 to 2,000 characters: unlike sizes, as
  in the built-in corpus."""
  rng = np.random.default_rng(seed)
  return ["\n\n".join(f"doc {d} paragraph {p} " + "x" * int(rng.integers(10, 2000))
                       for p in range(int(rng.integers(1, 61))))
          for d in range(n_docs)]


def test_paragraph_split_cuts_each_document_into_its_two_sides_in_order():
  all_docs = paragraph_docs(60)
  train, validation = split_paragraphs(all_docs, 0.1)
  by_doc = lambda part: {p.split(" paragraph")[0]: p.split("\n\n") for p in part}
  train_of, validation_of = by_doc(train), by_doc(validation)
  assert len(set(train_of) & set(validation_of)) > 10, "documents are cut, not moved whole"
  for doc in all_docs:
    name, paragraphs = doc.split(" paragraph")[0], doc.split("\n\n")
    kept, held = train_of.get(name, []), validation_of.get(name, [])
    assert sorted(kept + held) == sorted(paragraphs)
    # Each side keeps the document's order.
    assert kept == [p for p in paragraphs if p in kept]
    assert held == [p for p in paragraphs if p in held]


def test_paragraph_split_takes_the_fraction_of_characters_order_independently():
  all_docs = paragraph_docs(300)
  train, validation = split_paragraphs(all_docs, 0.05)
  share = sum(map(len, validation)) / sum(map(len, all_docs))
  # ~9,000 paragraphs of unlike sizes: within a few tenths of a percent of 5%.
  np.testing.assert_allclose(share, 0.05, atol=0.006)
  train2, validation2 = split_paragraphs(all_docs[::-1], 0.05)
  assert sorted(validation2) == sorted(validation) and sorted(train2) == sorted(train)


def test_identical_paragraphs_land_on_the_same_side():
  shared = [f"Copyright notice number {i}." for i in range(40)]
  all_docs = [f"doc {d}\n\n" + "\n\n".join(shared) for d in range(20)]
  train, validation = split_paragraphs(all_docs, 0.3)
  in_train = {p for doc in train for p in doc.split("\n\n")}
  in_validation = {p for doc in validation for p in doc.split("\n\n")}
  assert not in_train & in_validation
  assert in_validation & set(shared) and in_train & set(shared)


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_paragraph_split_keeps_both_parts_non_empty(fraction):
  train, validation = split_paragraphs(["a\n\nb", "c\n\n\n\nd"], fraction)
  assert train and validation
  assert all(doc.strip() for doc in train + validation)


def test_paragraph_split_of_one_paragraph_cuts_it_and_refuses_two_blank_ones():
  text = "".join(f"line {i}\n" for i in range(100))
  assert split_paragraphs([text], 0.1) == split_documents([text], 0.1)
  with pytest.raises(ValueError, match="1 non-blank paragraph"):
    split_paragraphs(["only one", "  "], 0.1)


def test_corpus_from_documents_splits_by_paragraph_when_asked():
  all_docs = paragraph_docs(20)
  corpus = corpus_from_documents("c", all_docs, validation_fraction=0.2, by_paragraph=True)
  assert (corpus.train, corpus.validation) == split_paragraphs(all_docs, 0.2)
