"""The built-in default corpus: English prose that every CPython installation ships.

Nothing is downloaded and nothing is imported from the standard library being read:
source files are parsed (`ast`, `tokenize`), so the text depends only on the
Python version and build, and is the same on every machine with the same Python.

What it contains, in this order:

1. pydoc topics. Every entry of `pydoc_data.topics.topics`, the language-reference
   and library sections that `help("assert")` and friends print, one document per
   topic, in sorted topic order, text as stored; a text shared by several topics
   is kept once (at its first topic).
2. Standard-library module prose. For every `.py` file under
   `sysconfig.get_paths()["stdlib"]`, in sorted path order, one document made of,
   in source-line order:
     * the first line "Module <dotted.name>";
     * every module, class and function docstring (cleaned as `inspect.cleandoc`
       does), each class/function docstring preceded by a line with its
       qualified name (e.g. "heapq.merge");
     * every block of consecutive `#` comment lines, with the `#` marks and the
       common indentation removed.
   Files with neither docstrings nor comments are left out. Left out as well are
   the folders that distributions strip or split into optional packages, so that
   the corpus does not depend on which of them are installed: EXCLUDED_DIRS below
   (the test suite, IDLE, Tkinter, turtledemo, lib2to3, ensurepip, distutils,
   third-party site-packages) and the platform-named `_sysconfigdata*` files.

The split into train and validation is by paragraph (`corpus.split_paragraphs`,
5% by default): each paragraph of each document goes by a hash of its text, and
a document keeps its paragraphs of each side in order. A split of whole
documents would draw validation from ~30 of them, and this corpus's documents
differ too much (a family of near-identical codec modules, license headers,
long reference topics) for that to be representative: over random hashes, the
validation loss of a trained tiny GPT then sits 0.3 nats (one standard
deviation) above or below its training loss. On CPython 3.11.7: 78 topic and
498 module documents, 3.72 million characters, 26,844 paragraphs; validation
holds 1,354 paragraphs (5.0%) of 315 documents, 186 thousand characters (5.0%);
training keeps 3.53 million characters in all 576 documents.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import os
import pydoc_data.topics
import sys
import sysconfig
import textwrap
import tokenize
from pathlib import Path

from fusedlm.research.data import partials
from fusedlm.research.data.corpus import Corpus, corpus_from_documents

EXCLUDED_DIRS = frozenset({
    "__pycache__", "site-packages", "dist-packages", "lib-dynload",
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo",
    "lib2to3", "ensurepip", "distutils",
})

# Comment lines that carry tooling directives, not prose.
_DIRECTIVE_PREFIXES = ("!", "-*-", "noqa", "type:", "pragma", "fmt:", "pylint:")


def builtin_corpus(validation_fraction: float = 0.05,
                   cache_dir: str | Path | None = None) -> Corpus:
  """The default corpus: pydoc topics plus standard-library docstrings and comments.

  Assembling it parses every stdlib file, which takes several seconds, so the
  result is memoized per process and, when `cache_dir` is given, stored there as
  JSON keyed by the interpreter, the stdlib files' sizes and mtimes, and this
  module's own source (see `installation_key`).
  """
  return _builtin_corpus(validation_fraction, None if cache_dir is None else str(cache_dir))


@functools.lru_cache(maxsize=2)
def _builtin_corpus(validation_fraction: float, cache_dir: str | None) -> Corpus:
  version = ".".join(map(str, sys.version_info[:3]))
  docs = builtin_documents(cache_dir)
  return corpus_from_documents(
      f"builtin-python{version}",
      docs,
      validation_fraction=validation_fraction,
      by_paragraph=True,
      description=(f"CPython {version} pydoc topics and standard-library docstrings and "
                   f"comments ({len(docs)} documents)"),
      source=f"the standard library at {stdlib_root()}",
  )


def builtin_documents(cache_dir: str | Path | None = None) -> list[str]:
  """All built-in documents, before the train/validation split, read from or
  written to `cache_dir` when given."""
  if cache_dir is None:
    return pydoc_topic_documents() + stdlib_module_documents()
  path = Path(cache_dir) / f"builtin-corpus-{installation_key()[:32]}.json"
  if path.exists():
    return json.loads(path.read_text(encoding="utf-8"))
  docs = pydoc_topic_documents() + stdlib_module_documents()
  path.parent.mkdir(parents=True, exist_ok=True)
  partials.publish(path, json.dumps(docs))  # Atomic: concurrent runs never read half a file.
  return docs


def installation_key(root: Path | None = None) -> str:
  """sha256 over what the built-in documents depend on; changes when any does."""
  root = stdlib_root() if root is None else root
  digest = hashlib.sha256()
  digest.update(sys.version.encode())
  digest.update(Path(__file__).read_bytes())
  for path in [Path(pydoc_data.topics.__file__)] + stdlib_module_files(root):
    stat = path.stat()
    digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def stdlib_root() -> Path:
  """The running interpreter's standard-library folder (the base one inside a venv)."""
  return Path(sysconfig.get_paths()["stdlib"])


def pydoc_topic_documents() -> list[str]:
  """One document per distinct pydoc topic text, in sorted topic order."""
  topics = pydoc_data.topics.topics
  # Some topics share a text ("if" and "else"); dict keys drop the repeats.
  return list(dict.fromkeys(topics[name] for name in sorted(topics)))


def stdlib_module_files(root: Path | None = None) -> list[Path]:
  """The standard library's .py files that the corpus reads, sorted by relative path."""
  root = stdlib_root() if root is None else root
  files = []
  for folder, subdirs, names in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS and not d.startswith("config-")]
    files.extend(Path(folder, name) for name in names
                 if name.endswith(".py") and not name.startswith("_sysconfigdata"))
  return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def stdlib_module_documents(root: Path | None = None) -> list[str]:
  """One prose document per standard-library module file (see module docstring)."""
  root = stdlib_root() if root is None else root
  docs = []
  for path in stdlib_module_files(root):
    doc = module_document(path.read_bytes(), module_name(path, root))
    if doc:
      docs.append(doc)
  return docs


def module_name(path: Path, root: Path) -> str:
  """Dotted module name of a stdlib file: json/decoder.py -> json.decoder."""
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__" and len(parts) > 1:
    parts.pop()
  return ".".join(parts)


def module_document(source: bytes, name: str) -> str:
  """The docstrings and comment blocks of one module's source, in line order.

  Returns "" when the source has no prose or does not parse on this Python.
  """
  try:
    tree = ast.parse(source)
    comments = _comment_blocks(source)
  except (SyntaxError, ValueError, tokenize.TokenError):
    return ""
  fragments = sorted(_docstrings(tree, name) + comments, key=lambda item: item[0])
  if not fragments:
    return ""
  return "\n\n".join([f"Module {name}"] + [text for _, text in fragments])


def _docstrings(tree: ast.Module, module: str) -> list[tuple[int, str]]:
  """(line, text) for the module docstring and every class/function docstring."""
  found = []
  doc = ast.get_docstring(tree, clean=True)
  if doc:
    found.append((tree.body[0].lineno, doc))

  def visit(statements: list[ast.stmt], prefix: str) -> None:
    # Docstrings only sit at the top of statement bodies, so walking statement
    # lists (not every expression node) finds them all, several times faster.
    for node in statements:
      if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        qualname = f"{prefix}.{node.name}"
        doc = ast.get_docstring(node, clean=True)
        if doc:
          found.append((node.body[0].lineno, f"{qualname}\n{doc}"))
        visit(node.body, qualname)
        continue
      for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        children = getattr(node, field, None)
        if isinstance(children, list):
          visit(children, prefix)

  visit(tree.body, module)
  return found


def _comment_blocks(source: bytes) -> list[tuple[int, str]]:
  """(first line, text) for each run of comments on consecutive lines."""
  blocks: list[tuple[int, list[str]]] = []
  last_line = -2
  for token in tokenize.tokenize(io.BytesIO(source).readline):
    if token.type != tokenize.COMMENT:
      continue
    line = token.start[0]
    text = token.string.lstrip("#")
    if line != last_line + 1 or not blocks:
      blocks.append((line, []))
    blocks[-1][1].append(text)
    last_line = line
  result = []
  for first_line, lines in blocks:
    text = _clean_comment_block(lines)
    if text:
      result.append((first_line, text))
  return result


def _clean_comment_block(lines: list[str]) -> str:
  """Joins one block's lines, dropping directives and lines without letters."""
  kept = [line.rstrip() for line in lines
          if not line.strip().startswith(_DIRECTIVE_PREFIXES)]
  # Rules such as "#----" or "########" carry no prose; blank lines inside a
  # block separate paragraphs and are kept.
  kept = [line for line in kept if not line.strip() or any(c.isalpha() for c in line)]
  text = textwrap.dedent("\n".join(kept)).strip("\n")
  return text if any(c.isalpha() for c in text) else ""
