"""User corpora: plain-text files, folders and globs, and JSON Lines with a text field.

A pattern may be a file, a folder (every non-hidden file below it, recursively) or
a glob (`**` recurses). Files are read in sorted path order so the corpus, and
therefore its fingerprint and the batches drawn from it, do not depend on the
order the file system lists them in.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from fusedlm.research.data.corpus import Corpus, corpus_from_documents

PathPatterns = str | os.PathLike | Sequence[str | os.PathLike]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def resolve_paths(patterns: PathPatterns,
                  suffixes: tuple[str, ...] | None = None) -> list[Path]:
  """Expands files, folders and globs into a sorted, de-duplicated list of files.

  Args:
    patterns: one pattern or a sequence of them.
    suffixes: when given, files found inside folders must end with one of these
      (explicit file paths and glob matches are taken as they are).

  Raises:
    FileNotFoundError: a pattern matches no file; the message names it.
  """
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  if not patterns:
    raise FileNotFoundError("no corpus path given")
  files: set[Path] = set()
  for pattern in patterns:
    matched = _expand(Path(pattern), suffixes)
    if not matched:
      raise FileNotFoundError(f"no files match {str(pattern)!r}")
    files.update(matched)
  return sorted(files)


def _expand(pattern: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
  if pattern.is_file():
    return [pattern]
  if pattern.is_dir():
    return [path for path in pattern.rglob("*")
            if path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(pattern).parts)
            and (suffixes is None or path.name.endswith(suffixes))]
  return [Path(match) for match in glob.glob(str(pattern), recursive=True)
          if Path(match).is_file()]


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
  """The file's text; raises ValueError naming the file when it does not decode."""
  try:
    return path.read_text(encoding=encoding)
  except UnicodeDecodeError as error:
    raise ValueError(f"{path} is not {encoding} text ({error.reason} at byte "
                     f"{error.start}); is it a binary file?") from error


def text_documents(files: Iterable[Path], document_separator: str | None = None,
                   encoding: str = "utf-8") -> list[str]:
  """Documents of plain-text files: one per file, or split on `document_separator`."""
  docs = []
  for path in files:
    text = read_text_file(path, encoding)
    docs.extend([text] if document_separator is None else text.split(document_separator))
  return docs


def jsonl_documents(files: Iterable[Path], text_field: str = "text",
                    encoding: str = "utf-8") -> list[str]:
  """The `text_field` string of every JSON object, one per non-blank line.

  Raises:
    ValueError: a line is not a JSON object, lacks the field, or the field is not
      a string; the message gives file, line number and the fields present.
  """
  docs = []
  for path in files:
    for line_number, line in enumerate(read_text_file(path, encoding).splitlines(), 1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
      if text_field not in record:
        raise ValueError(f"{where}: missing text field {text_field!r}; "
                         f"fields present: {sorted(record)}")
      if not isinstance(record[text_field], str):
        raise ValueError(f"{where}: field {text_field!r} is "
                         f"{type(record[text_field]).__name__}, expected a string")
      docs.append(record[text_field])
  return docs


def text_corpus(
    patterns: PathPatterns,
    *,
    validation_patterns: PathPatterns | None = None,
    document_separator: str | None = None,
    validation_fraction: float = 0.05,
    encoding: str = "utf-8",
    name: str | None = None,
) -> Corpus:
  """A corpus of plain-text files.

  Args:
    patterns: files, folders or globs of training text (or of all text when
      `validation_patterns` is None).
    validation_patterns: explicit validation files; otherwise documents are
      hash-split (`corpus.split_documents`), and a single document is cut at a line.
    document_separator: split each file into documents on this string (e.g.
      "\\n\\n" for paragraphs); None keeps one document per file.
    validation_fraction: share hashed into validation when no validation files.
    encoding: text encoding of the files.
    name: corpus name; defaults to the first file's stem.

  Raises:
    FileNotFoundError: a pattern matches no file.
    ValueError: the text is empty, or a file does not decode.
  """
  files = resolve_paths(patterns)
  validation = None
  if validation_patterns is not None:
    validation = text_documents(resolve_paths(validation_patterns), document_separator,
                                encoding)
  return corpus_from_documents(
      name or files[0].stem,
      text_documents(files, document_separator, encoding),
      validation_fraction=validation_fraction,
      validation_docs=validation,
      description=f"text files: {_describe(files)}",
      source=_describe(files),
  )


def jsonl_corpus(
    patterns: PathPatterns,
    *,
    text_field: str = "text",
    validation_patterns: PathPatterns | None = None,
    validation_fraction: float = 0.05,
    encoding: str = "utf-8",
    name: str | None = None,
) -> Corpus:
  """A corpus of JSON Lines files, one document per line's `text_field`.

  Folders contribute their files ending in JSONL_SUFFIXES. Other arguments and
  errors as `text_corpus`, plus ValueError for a missing or non-string field.
  """
  files = resolve_paths(patterns, JSONL_SUFFIXES)
  validation = None
  if validation_patterns is not None:
    validation = jsonl_documents(resolve_paths(validation_patterns, JSONL_SUFFIXES),
                                 text_field, encoding)
  return corpus_from_documents(
      name or files[0].stem,
      jsonl_documents(files, text_field, encoding),
      validation_fraction=validation_fraction,
      validation_docs=validation,
      description=f"JSON Lines field {text_field!r}: {_describe(files)}",
      source=_describe(files),
  )


def _describe(files: Sequence[Path]) -> str:
  shown = ", ".join(str(path) for path in files[:3])
  return shown + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
