"""The built-in labelled task: which area of the standard library a docstring documents.

Nothing to download. Every class, function and module docstring of the
standard-library packages in TOPICS becomes one example labelled with its
topic, e.g. an `asyncio.StreamReader.readline` docstring is "concurrency" and
an `email.message.Message.get_payload` one is "email":

  concurrency  asyncio, concurrent, multiprocessing, threading, queue
  email        email, mailbox, smtplib, imaplib, poplib
  web          http, urllib, wsgiref, socketserver
  xml          xml (dom, sax, etree, parsers)
  testing      unittest, doctest

The text is the docstring alone: the qualified-name line that the pretraining
corpus puts before it would give the label away. Docstrings shorter than
MIN_CHARS are left out, and a text that occurs more than once is kept once,
or dropped when it occurs under two topics. Examples are split into train and
validation by a hash of their text (as corpora are), so the split does not
depend on file order. On CPython 3.11.7: 1,741 examples (concurrency 555,
email 463, web 313, testing 209, xml 201), 351 of them for validation; the
largest class is 31% of validation, the level a classifier must beat.

The pretraining corpus (`stdlib_corpus`) contains these docstrings too, without
labels, as in any pretrain-then-fine-tune setting on in-domain text.
"""

from __future__ import annotations

import ast
import functools

import numpy as np

from fusedlm.research.data import stdlib_corpus
from fusedlm.research.data.classification import LabeledExamples, split_examples

NAME = "stdlib_topics"
TOPICS = {
    "concurrency": ("asyncio", "concurrent", "multiprocessing", "threading", "queue"),
    "email": ("email", "mailbox", "smtplib", "imaplib", "poplib"),
    "web": ("http", "urllib", "wsgiref", "socketserver"),
    "xml": ("xml",),
    "testing": ("unittest", "doctest"),
}
LABEL_NAMES = tuple(sorted(TOPICS))
MIN_CHARS = 40


def topic_of(module: str) -> str | None:
  """The topic of a dotted module name, by its top-level package (None: none)."""
  top = module.split(".")[0]
  for topic, packages in TOPICS.items():
    if top in packages:
      return topic
  return None


@functools.lru_cache(maxsize=1)
def labelled_docstrings() -> tuple[tuple[str, str], ...]:
  """(text, topic) for every kept docstring, in stdlib file and line order."""
  root = stdlib_corpus.stdlib_root()
  found: dict[str, str | None] = {}  # text -> topic; None once seen under two
  for path in stdlib_corpus.stdlib_module_files(root):
    module = stdlib_corpus.module_name(path, root)
    topic = topic_of(module)
    if topic is None:
      continue
    try:
      tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
      continue
    for text in _docstrings(tree):
      if len(text) < MIN_CHARS:
        continue
      if text in found and found[text] != topic:
        found[text] = None
      else:
        found.setdefault(text, topic)
  return tuple((text, topic) for text, topic in found.items() if topic is not None)


def _docstrings(tree: ast.Module) -> list[str]:
  """The module's own docstring and those of every class and function in it."""
  nodes = [tree] + [node for node in ast.walk(tree) if isinstance(
      node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  texts = [ast.get_docstring(node, clean=True) for node in nodes]
  return [text for text in texts if text]


def stdlib_topics(validation_fraction: float = 0.2) -> tuple[LabeledExamples, LabeledExamples]:
  """(train, validation) examples of the task; labels index LABEL_NAMES."""
  index = {name: i for i, name in enumerate(LABEL_NAMES)}
  items = labelled_docstrings()
  examples = LabeledExamples(
      texts=[text for text, _ in items],
      labels=np.array([index[topic] for _, topic in items], dtype=np.int32),
      label_names=LABEL_NAMES)
  return split_examples(examples, validation_fraction, NAME)
