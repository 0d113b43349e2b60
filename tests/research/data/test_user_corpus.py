"""User corpora from text files, folders, globs and JSON Lines, and their errors."""

import json

import pytest

from fusedlm.research.data.user_corpus import jsonl_corpus, resolve_paths, text_corpus


@pytest.fixture
def text_tree(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / ".hidden").mkdir()
  for relative, text in {"b.txt": "bee\n", "a.txt": "ay\n", "sub/c.md": "see\n",
                         ".hidden/h.txt": "secret\n", "sub/.dot.txt": "dot\n"}.items():
    (tmp_path / relative).write_text(text)
  return tmp_path


def test_folder_gives_every_visible_file_in_sorted_order(text_tree):
  files = resolve_paths(text_tree)
  assert [f.relative_to(text_tree).as_posix() for f in files] == ["a.txt", "b.txt", "sub/c.md"]


def test_globs_and_files_combine_without_duplicates(text_tree):
  files = resolve_paths([str(text_tree / "**" / "*.txt"), text_tree / "a.txt"])
  # Like the shell, globs skip hidden files and folders.
  assert [f.relative_to(text_tree).as_posix() for f in files] == ["a.txt", "b.txt"]


def test_text_corpus_one_document_per_file_or_per_separator(text_tree):
  corpus = text_corpus(text_tree, validation_patterns=text_tree / "sub")
  assert corpus.train == ["ay\n", "bee\n", "see\n"] and corpus.validation == ["see\n"]
  (text_tree / "paras.txt").write_text("one\n\ntwo\n\n\n\nthree")
  split = text_corpus(text_tree / "paras.txt", document_separator="\n\n",
                      validation_patterns=text_tree / "a.txt")
  assert split.train == ["one", "two", "three"]


def test_no_match_names_the_pattern(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    text_corpus(tmp_path / "nothing-here" / "*.txt")
  with pytest.raises(FileNotFoundError, match="no files match"):
    jsonl_corpus([tmp_path / "missing.jsonl"])


def test_empty_text_is_rejected(tmp_path):
  (tmp_path / "blank.txt").write_text("\n   \n")
  with pytest.raises(ValueError, match="is empty.*blank.txt"):
    text_corpus(tmp_path / "blank.txt")


def test_binary_file_is_named(tmp_path):
  (tmp_path / "data.bin").write_bytes(b"\xff\xfe\x00\x81")
  with pytest.raises(ValueError, match="data.bin is not utf-8 text"):
    text_corpus(tmp_path)


def write_jsonl(path, records):
  lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
  path.write_text("".join(line + "\n" for line in lines))
  return path


def test_jsonl_reads_the_named_field_skipping_blank_lines(tmp_path):
  write_jsonl(tmp_path / "d.jsonl", [{"body": "first", "id": 1}, "", {"body": "second"}])
  (tmp_path / "ignored.txt").write_text("not json")
  corpus = jsonl_corpus(tmp_path, text_field="body", validation_patterns=tmp_path / "d.jsonl")
  assert corpus.train == ["first", "second"]


@pytest.mark.parametrize("record, message", [
    ({"text": "x"}, r"d.jsonl:2: missing text field 'body'; fields present: \['text'\]"),
    ({"body": 3}, r"d.jsonl:2: field 'body' is int"),
    ("[1, 2]", r"d.jsonl:2: expected a JSON object"),
    ("{oops", r"d.jsonl:2: not valid JSON"),
])
def test_bad_jsonl_records_are_located(tmp_path, record, message):
  write_jsonl(tmp_path / "d.jsonl", [{"body": "fine"}, record])
  with pytest.raises(ValueError, match=message):
    jsonl_corpus(tmp_path / "d.jsonl", text_field="body")
