"""The built-in extractive-QA task: questions about a standard-library object's card.

Nothing to download. Every documented function, class and method of the
standard library (the files the built-in corpus reads, research.data.stdlib_corpus)
gets a context, its "card": a Name line, then its fields in an order drawn
from a hash of the name, so that no field sits at a fixed place:

  Name: JSONDecoder.decode
  Summary: Return the Python representation of ``s`` (a ``str`` instance
  Kind: method
  Details: containing a JSON document).
  Class: JSONDecoder
  Module: json.decoder

(Summary: the docstring's first line; Details: the rest of the docstring,
its first DETAIL_WORDS words, when there is a rest; Class: only for
methods.) Each card asks four questions, SQuAD 2.0 style:

  "Which module defines JSONDecoder.decode?"           -> "json.decoder"
  "What kind of object is JSONDecoder.decode?"         -> "method"
  "What does JSONDecoder.decode do?"                   -> the summary
  "Which class is JSONDecoder.decode a method of?"     -> "JSONDecoder", or no
                                                          answer for a function
                                                          or class (no Class line)

so a model must read which field the question asks for, find that field's
line wherever it is, take its value (one word, a dotted name, or a sentence),
and see when the field is absent. Cards are split into train and validation
by a hash of their text (research.data.squad.split_questions).

Trivial baselines (research.objectives.qa.trivial_baselines, on the
validation split): "no answer" to every question, and the value of the
card's first field after the name to every question. On CPython 3.11.7:
5,576 cards, 22,304 questions (2,388 unanswerable); validation holds 580
cards and 2,320 questions (259 unanswerable), where always "no answer"
scores EM 11.2 / F1 11.2 and always the first field EM 21.8 / F1 22.9, the
levels a fine-tuned model must beat.

The pretraining corpus (`stdlib_corpus`) contains these docstrings, in another
layout, as in-domain text in any pretrain-then-fine-tune setting.
"""

from __future__ import annotations

import ast
import dataclasses
import functools

from fusedlm.research.data import stdlib_corpus
from fusedlm.research.data.corpus import document_hash
from fusedlm.research.data.squad import QAData, Question, split_questions

NAME = "stdlib_qa"
MIN_CHARS, MAX_CHARS = 20, 90  # of a summary line
DETAIL_WORDS = 40


@dataclasses.dataclass(frozen=True)
class Card:
  """What a card says about one documented object."""

  module: str
  name: str  # qualified within the module: "JSONDecoder.decode"
  kind: str  # "function" | "class" | "method"
  owner: str  # a method's class; "" otherwise
  summary: str
  details: str  # "" when the docstring has nothing past its summary line


def _cards(tree: ast.Module, module: str) -> list[Card]:
  """The module's documented functions and classes, and its classes' methods."""
  found = []

  def visit(statements, owner: str) -> None:
    for node in statements:
      if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      doc = ast.get_docstring(node, clean=True)
      is_class = isinstance(node, ast.ClassDef)
      summary = doc.splitlines()[0].strip() if doc else ""
      if MIN_CHARS <= len(summary) <= MAX_CHARS:
        details = " ".join(doc.split("\n", 1)[1].split()[:DETAIL_WORDS]) if "\n" in doc else ""
        kind = "class" if is_class else ("method" if owner else "function")
        name = f"{owner}.{node.name}" if owner else node.name
        found.append(Card(module, name, kind, owner, summary, details))
      if is_class and not owner:  # methods of top-level classes
        visit(node.body, node.name)

  visit(tree.body, "")
  return found


@functools.lru_cache(maxsize=1)
def cards() -> tuple[Card, ...]:
  """Every card, in stdlib file and source order."""
  root = stdlib_corpus.stdlib_root()
  found = []
  for path in stdlib_corpus.stdlib_module_files(root):
    try:
      tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
      continue
    found += _cards(tree, stdlib_corpus.module_name(path, root))
  return tuple(found)


def card_text(card: Card) -> tuple[str, dict[str, int]]:
  """(the context, {field: first character of its value})."""
  fields = [("Summary", card.summary), ("Kind", card.kind), ("Module", card.module)]
  if card.details:
    fields.append(("Details", card.details))
  if card.owner:
    fields.append(("Class", card.owner))
  order = document_hash(f"{card.module}:{card.name}")
  shuffled = []
  while fields:  # a permutation drawn from the hash
    order, pick = divmod(order, len(fields))
    shuffled.append(fields.pop(pick))
  text, starts = f"Name: {card.name}", {}
  for label, value in shuffled:
    text += f"\n{label}: "
    starts[label] = len(text)
    text += value
  return text, starts


@functools.lru_cache(maxsize=1)
def stdlib_qa_data() -> QAData:
  """Every card's four questions, in stdlib order (see the module docstring)."""
  questions = []
  for index, card in enumerate(cards()):
    context, starts = card_text(card)
    asks = [("module", f"Which module defines {card.name}?", "Module", card.module),
            ("kind", f"What kind of object is {card.name}?", "Kind", card.kind),
            ("summary", f"What does {card.name} do?", "Summary", card.summary),
            ("class", f"Which class is {card.name} a method of?", "Class", card.owner)]
    for key, question, label, value in asks:
      answers = ((value, starts[label]),) if value else ()
      questions.append(Question(f"{card.module}:{index}:{key}", question, context, answers))
  return QAData(questions, NAME, version2=True)


def stdlib_qa(validation_fraction: float = 0.1) -> tuple[QAData, QAData]:
  """(train, validation) questions of the task, split by card."""
  return split_questions(stdlib_qa_data(), validation_fraction)


def first_field(context: str) -> str:
  """The value of the card's first field after its name (a trivial baseline's answer)."""
  return context.split("\n")[1].split(": ", 1)[1]
