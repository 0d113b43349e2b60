"""The built-in corpus: contents, size, splitting, and the on-disk memo."""

import pydoc_data.topics

import numpy as np
import pytest

from fusedlm.research.data import stdlib_corpus
from fusedlm.research.data.corpus import corpus_from_documents, split_paragraphs

MODULE_SOURCE = b'''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module summary.

More words."""

# A block comment that explains
#   why, over two lines.
X = "# not a comment"  # noqa: E501
#----------------------

class Thing:
  """A thing."""

  def method(self):
    """Does it."""
    if True:
      def inner():
        """Nested in an if."""
    return X  # trailing note
'''


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
  """(documents, cache folder): the full corpus, assembled once and memoized on disk."""
  cache = tmp_path_factory.mktemp("builtin")
  return stdlib_corpus.builtin_documents(cache), cache


def test_module_document_keeps_docstrings_and_comments_in_line_order():
  text = stdlib_corpus.module_document(MODULE_SOURCE, "pkg.mod")
  assert text.split("\n\n") == [
      "Module pkg.mod",
      "Module summary.",
      "More words.",
      "A block comment that explains\n  why, over two lines.",
      "pkg.mod.Thing\nA thing.",
      "pkg.mod.Thing.method\nDoes it.",
      "pkg.mod.Thing.method.inner\nNested in an if.",
      "trailing note",
  ]


def test_unparsable_or_prose_free_sources_give_no_document():
  assert stdlib_corpus.module_document(b"def broken(:\n", "m") == ""
  assert stdlib_corpus.module_document(b"x = 1\n", "m") == ""


def test_excluded_folders_and_platform_files_are_skipped(tmp_path):
  for relative in ["a.py", "pkg/__init__.py", "pkg/b.py", "test/t.py", "idlelib/i.py",
                   "site-packages/s.py", "_sysconfigdata_x.py", "notes.txt"]:
    (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / relative).write_text('"""doc"""\n')
  files = stdlib_corpus.stdlib_module_files(tmp_path)
  assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.py", "pkg/__init__.py",
                                                                "pkg/b.py"]
  assert [stdlib_corpus.module_name(f, tmp_path) for f in files] == ["a", "pkg", "pkg.b"]


def test_full_corpus_holds_all_topics_then_module_prose(assembled):
  docs, _ = assembled
  topics = pydoc_data.topics.topics
  distinct = list(dict.fromkeys(topics[name] for name in sorted(topics)))
  assert len(distinct) > 70
  assert docs[:len(distinct)] == distinct
  modules = docs[len(distinct):]
  assert all(doc.startswith("Module ") for doc in modules)
  names = {doc.split("\n", 1)[0] for doc in modules}
  assert {"Module heapq", "Module json.decoder", "Module collections"} <= names
  assert not any(name.startswith(("Module test.", "Module idlelib", "Module tkinter"))
                 for name in names)


def test_full_corpus_is_several_megabytes_split_by_paragraph_at_the_fraction(assembled):
  docs, _ = assembled
  corpus = corpus_from_documents("builtin", docs, by_paragraph=True)
  total = sum(map(len, docs))
  assert total > 3_000_000
  # Thousands of paragraphs: the validation share of characters is the
  # fraction to within a few tenths of a percent (whole documents: 2.6% here).
  np.testing.assert_allclose(corpus.num_chars("validation") / total, 0.05, atol=0.005)
  assert len(corpus.train) == len(docs) and len(corpus.validation) > 100


def test_second_load_reads_the_memo_without_parsing(assembled, monkeypatch):
  docs, cache = assembled
  monkeypatch.setattr(stdlib_corpus, "stdlib_module_documents",
                      lambda root=None: pytest.fail("parsed the standard library again"))
  assert stdlib_corpus.builtin_documents(cache) == docs
  corpus = stdlib_corpus.builtin_corpus(cache_dir=cache)
  assert corpus.train + corpus.validation != []
  assert corpus.name.startswith("builtin-python3.")
  assert (corpus.train, corpus.validation) == split_paragraphs(docs, 0.05)


def test_memo_key_changes_when_a_source_file_changes(tmp_path):
  (tmp_path / "a.py").write_text('"""one"""\n')
  before = stdlib_corpus.installation_key(tmp_path)
  (tmp_path / "a.py").write_text('"""two!"""\n')
  assert stdlib_corpus.installation_key(tmp_path) != before
