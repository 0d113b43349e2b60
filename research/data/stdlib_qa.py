"""The built-in extractive-QA task: which function does this summary describe?

Nothing to download. Contexts are made from the standard library's
docstrings: for each module, its documented functions and classes in source
order, CONTEXT_ENTRIES at a time, one line each, "<name>: <summary>" (the name
relative to the module, e.g. "JSONDecoder.raw_decode", and the summary the
docstring's first line):

  context   "Module json.decoder.\\nJSONDecoder: Simple JSON decoder.\\n
             JSONDecoder.decode: Return the Python representation of s ..."
  question  "Return the Python representation of s ..."   (a summary)
  answer    "JSONDecoder.decode"                           (its name)

Every entry's summary asks for its name. Each context also gets one
unanswerable question (SQuAD 2.0 style): the first summary of the next
context, which this one does not hold; so a model must find the question's
line, or see that it is absent, and give the name before it. Summaries that
occur twice anywhere are left out (their answer would be ambiguous), as are
ones shorter than MIN_CHARS or longer than MAX_CHARS. Contexts are split into
train and validation by a hash of their text (research.data.squad).

Trivial baselines (research.objectives.qa.trivial_baselines, on the validation split): answering
"no answer" to everything, or the first name of the context to everything.
On CPython 3.11.7: 2,637 contexts and 12,641 questions (2,637 unanswerable);
validation holds 260 contexts and 1,240 questions, where always "no answer"
scores EM 21.0 / F1 21.0 and always the first name EM 17.1 / F1 17.4, the
levels a fine-tuned model must beat.

The pretraining corpus (`stdlib_corpus`) contains these docstrings, in another
layout, as in-domain text in any pretrain-then-fine-tune setting.
"""

from __future__ import annotations

import ast
import functools
import re

from fusedlm.research.data import stdlib_corpus
from fusedlm.research.data.squad import QAData, Question, split_questions

NAME = "stdlib_qa"
CONTEXT_ENTRIES = 3
QUERY_WORDS = 4
MIN_CHARS, MAX_CHARS = 20, 90


def _summaries(tree: ast.Module) -> list[tuple[str, str]]:
  """(name, docstring's first line) of every function and class, in source order."""
  found = []

  def visit(statements) -> None:
    for node in statements:
      if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
          found.append((node.name, doc.splitlines()[0].strip()))
        visit(node.body)

  visit(tree.body)
  return found


@functools.lru_cache(maxsize=1)
def module_entries() -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
  """(module, its (name, summary) entries) for every stdlib module, with the
  summaries that occur more than once anywhere, or are too short or long, left out."""
  root = stdlib_corpus.stdlib_root()
  modules = []
  for path in stdlib_corpus.stdlib_module_files(root):
    try:
      tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
      continue
    entries = [(n, s) for n, s in _summaries(tree) if MIN_CHARS <= len(s) <= MAX_CHARS]
    if entries:
      modules.append((stdlib_corpus.module_name(path, root), entries))
  counts: dict[str, int] = {}
  for _, entries in modules:
    for _, summary in entries:
      counts[summary] = counts.get(summary, 0) + 1
  return tuple((module, tuple(e for e in entries if counts[e[1]] == 1))
               for module, entries in modules)


def keywords(text: str, absent: set[str]) -> list[str]:
  """text's words of 3+ letters, lower-cased, not in `absent`, each once, in order,
  at most QUERY_WORDS."""
  found = [w for w in dict.fromkeys(_words(text)) if w not in absent]
  return found[:QUERY_WORDS]


def _words(text: str) -> list[str]:
  return re.findall(r"[a-z]{3,}", text.lower())


@functools.lru_cache(maxsize=1)
def stdlib_qa_data() -> QAData:
  """Every context's questions, in stdlib file order (see the module docstring)."""
  chunks = []  # (module, entries of one context)
  for module, entries in module_entries():
    for start in range(0, len(entries), CONTEXT_ENTRIES):
      part = entries[start:start + CONTEXT_ENTRIES]
      if len(part) >= 2:
        chunks.append((module, part))
  questions = []
  for c, (module, entries) in enumerate(chunks):
    context, starts = f"Module {module}.", []
    for name, summary in entries:
      context += "\n* "
      starts.append(len(context))
      context += f"{name}: {summary}"
    for i, ((name, summary), start) in enumerate(zip(entries, starts)):
      others = set(_words(context.replace(summary, " ", 1)))
      query = keywords(summary, others)
      if query:
        questions.append(Question(f"{module}:{c}:{i}", " ".join(query), context,
                                  ((name, start),)))
    query = keywords(chunks[(c + 1) % len(chunks)][1][0][1], set(_words(context)))
    if query:
      questions.append(Question(f"{module}:{c}:none", " ".join(query), context, ()))
  return QAData(questions, NAME, version2=True)


def stdlib_qa(validation_fraction: float = 0.1) -> tuple[QAData, QAData]:
  """(train, validation) questions of the task, split by context."""
  return split_questions(stdlib_qa_data(), validation_fraction)


def first_name(context: str) -> str:
  """The first entry's name (its line's text between "* " and ": ")."""
  line = context.split("\n")[1]
  return line[2:].split(": ", 1)[0]
