"""A text corpus: named train and validation documents with a content fingerprint.

Every corpus source (built-in, synthetic, user files) produces a `Corpus`. Its
`fingerprint` hashes the documents themselves, not where they came from, so the
tokenized-data cache (`research.data.cache`) stays valid when files move and is
invalidated when any character changes.

When a source has no explicit validation part, `split_documents` assigns each
document by a hash of its text: the assignment does not depend on document order,
and duplicated documents always land on the same side, so exact duplicates
cannot leak from train into validation.

`split_paragraphs` does the same one level down, for corpora of few, long and
unlike documents (the built-in one): each paragraph goes by the hash of its
text, and every document keeps its paragraphs of each side, in order. A
document-level split of such a corpus draws its validation part from a few
dozen documents, so its share of characters and its difficulty swing with
which ones the hash picks; thousands of paragraphs give a validation part that
holds the requested share of characters and reads like the training part.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Sequence

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents of one corpus, split into train and validation parts.

  Attributes:
    name: short human-readable name, used in cache folder names and logs.
    train: training documents, in a fixed order.
    validation: validation documents, in a fixed order.
    description: what the corpus contains, for run logs.
  """

  name: str
  train: list[str]
  validation: list[str]
  description: str = ""

  def split(self, split: str) -> list[str]:
    """The documents of `split` ("train" or "validation")."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return self.train if split == "train" else self.validation

  def num_chars(self, split: str) -> int:
    return sum(len(doc) for doc in self.split(split))

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 hex digest of both splits' documents (names and order included)."""
    digest = hashlib.sha256()
    for split in SPLITS:
      docs = self.split(split)
      digest.update(f"{split}:{len(docs)}\n".encode())
      for doc in docs:
        data = doc.encode("utf-8")
        # Length-prefixing keeps ["ab", "c"] and ["a", "bc"] apart.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def document_hash(text: str) -> int:
  """A stable 64-bit hash of a document's text (Python's hash() is salted)."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def split_documents(
    docs: Sequence[str], validation_fraction: float
) -> tuple[list[str], list[str]]:
  """Assigns documents to (train, validation) by a hash of their text.

  A document goes to validation when its hash falls in the lowest
  `validation_fraction` of the 64-bit range, so the expected validation share is
  `validation_fraction` of the documents. Both parts are kept non-empty: with a
  single document, it is cut at the line break nearest to the requested share;
  otherwise the document with the smallest (largest) hash moves over when a part
  came out empty. Order within each part follows `docs`.

  Raises:
    ValueError: `validation_fraction` outside (0, 1), or no documents.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  if not docs:
    raise ValueError("cannot split an empty list of documents")
  if len(docs) == 1:
    return _cut_single_document(docs[0], validation_fraction)
  threshold = int(validation_fraction * 2**64)
  hashes = [document_hash(doc) for doc in docs]
  in_validation = [h < threshold for h in hashes]
  if not any(in_validation):
    in_validation[min(range(len(docs)), key=hashes.__getitem__)] = True
  if all(in_validation):
    in_validation[max(range(len(docs)), key=hashes.__getitem__)] = False
  train = [doc for doc, val in zip(docs, in_validation) if not val]
  validation = [doc for doc, val in zip(docs, in_validation) if val]
  return train, validation


PARAGRAPH_BREAK = "\n\n"


def split_paragraphs(
    docs: Sequence[str], validation_fraction: float
) -> tuple[list[str], list[str]]:
  """Assigns the paragraphs of every document to (train, validation) by hash.

  Paragraphs are the pieces between PARAGRAPH_BREAK ("\n\n"); one goes to
  validation when its hash falls in the lowest `validation_fraction` of the
  64-bit range, so identical paragraphs (licence headers, repeated notes) land
  on the same side. A document contributes its training paragraphs, rejoined
  in order, as one training document and its validation paragraphs as one
  validation document (none where it has none on that side), so the training
  text is the original with the validation paragraphs cut out. Both parts are
  kept non-empty as `split_documents` keeps them; a single one-paragraph
  document is cut at a line break.

  Raises:
    ValueError: `validation_fraction` outside (0, 1), no documents, or fewer
      than two non-blank paragraphs in several documents.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  if not docs:
    raise ValueError("cannot split an empty list of documents")
  pieces = [doc.split(PARAGRAPH_BREAK) for doc in docs]
  flat = [piece for doc in pieces for piece in doc]
  if len(docs) == 1 and len(flat) == 1:
    return _cut_single_document(docs[0], validation_fraction)
  threshold = int(validation_fraction * 2**64)
  hashes = [document_hash(piece) for piece in flat]
  # Blank pieces (from runs of blank lines) stay in training, where they keep
  # the document's spacing; they carry nothing to validate on.
  text = [i for i, piece in enumerate(flat) if piece.strip()]
  if len(text) < 2:
    raise ValueError(f"{len(text)} non-blank paragraph(s) cannot be split into "
                     "non-empty train and validation parts")
  in_validation = [False] * len(flat)
  for i in text:
    in_validation[i] = hashes[i] < threshold
  if not any(in_validation):
    in_validation[min(text, key=hashes.__getitem__)] = True
  if all(in_validation[i] for i in text):
    in_validation[max(text, key=hashes.__getitem__)] = False
  train, validation = [], []
  start = 0
  for doc in pieces:
    sides = in_validation[start:start + len(doc)]
    start += len(doc)
    for part, side in ((train, False), (validation, True)):
      kept = PARAGRAPH_BREAK.join(piece for piece, val in zip(doc, sides) if val == side)
      if kept.strip():
        part.append(kept)
  return train, validation


def _cut_single_document(doc: str, validation_fraction: float) -> tuple[list[str], list[str]]:
  """Splits one document into a train head and a validation tail at a line break."""
  target = int(len(doc) * (1.0 - validation_fraction))
  # Cut just after the newline nearest to the target on either side.
  breaks = [doc.rfind("\n", 0, target) + 1, doc.find("\n", target) + 1]
  breaks = [b for b in breaks if 0 < b < len(doc)]
  cut = min(breaks, key=lambda b: abs(b - target)) if breaks else target
  cut = min(max(cut, 1), len(doc) - 1)
  head, tail = doc[:cut], doc[cut:]
  if not head.strip() or not tail.strip():
    raise ValueError(
        f"a corpus of one document of {len(doc)} characters cannot be split into "
        "non-empty train and validation parts; give more text or a validation source")
  return [head], [tail]


def non_blank(docs: Iterable[str]) -> list[str]:
  """Drops documents that are empty or whitespace only."""
  return [doc for doc in docs if doc.strip()]


def corpus_from_documents(
    name: str,
    docs: Iterable[str],
    *,
    validation_fraction: float = 0.05,
    validation_docs: Iterable[str] | None = None,
    by_paragraph: bool = False,
    description: str = "",
    source: str = "",
) -> Corpus:
  """Builds a Corpus from documents, hash-splitting off validation unless given.

  Args:
    name: corpus name.
    docs: all documents, or the training documents when `validation_docs` is given.
    validation_fraction: share of documents (of paragraphs, with
      `by_paragraph`) hashed into validation.
    validation_docs: explicit validation documents; disables hash splitting.
    by_paragraph: hash paragraphs, not whole documents (`split_paragraphs`).
    description: free text stored on the corpus.
    source: where the text came from, for error messages.

  Raises:
    ValueError: no non-blank document (train or explicit validation).
  """
  docs = non_blank(docs)
  where = f" from {source}" if source else ""
  if not docs:
    raise ValueError(f"corpus {name!r} is empty: no non-blank documents{where}")
  if validation_docs is None:
    split = split_paragraphs if by_paragraph else split_documents
    train, validation = split(docs, validation_fraction)
  else:
    train, validation = docs, non_blank(validation_docs)
    if not validation:
      raise ValueError(f"corpus {name!r} has an empty validation part{where}")
  return Corpus(name=name, train=train, validation=validation, description=description)
