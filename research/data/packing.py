"""Documents joined into one stream, each followed by a separator token.

The stream is virtual: windows are gathered straight from the flat token array
(usually a memmap), so packing never copies the corpus and a process reads only
the windows it returns. Stream layout for documents d0, d1, ... and separator S:

  d0[0] ... d0[-1] S d1[0] ... d1[-1] S ...

A separator belongs to the document it ends; `gather` reports, for every stream
position, its document and its offset within that document (the separator has
offset len(document)).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from fusedlm.research.data.cache import TokenizedSplit


@dataclasses.dataclass(frozen=True)
class StreamWindows:
  """Windows gathered from a stream; all arrays [rows, width].

  Attributes:
    ids: int32 token ids (the separator where a document ends; 0 past the end).
    doc: int64 document index of each position.
    offset: int64 position within its document.
    valid: bool, False past the end of the stream.
  """

  ids: np.ndarray
  doc: np.ndarray
  offset: np.ndarray
  valid: np.ndarray


@dataclasses.dataclass(frozen=True)
class SeparatedStream:
  """`split`'s documents back to back, each followed by `separator_id`."""

  split: TokenizedSplit
  separator_id: int

  @functools.cached_property
  def doc_starts(self) -> np.ndarray:
    """int64 [num_docs]: stream position of each document's first token."""
    return self.split.doc_offsets[:-1] + np.arange(self.split.num_docs)

  @property
  def length(self) -> int:
    """Tokens in the stream: every token plus one separator per document."""
    return self.split.num_tokens + self.split.num_docs

  def gather(self, starts: np.ndarray, width: int) -> StreamWindows:
    """The windows stream[start:start + width] for each start (int [rows])."""
    positions = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(width)
    valid = positions < self.length
    positions = np.minimum(positions, self.length - 1)
    doc = np.searchsorted(self.doc_starts, positions, side="right") - 1
    offset = positions - self.doc_starts[doc]
    lengths = self.split.doc_lengths[doc]
    is_separator = offset >= lengths
    flat = np.clip(self.split.doc_offsets[doc] + offset, 0, max(self.split.num_tokens - 1, 0))
    ids = np.where(is_separator, self.separator_id, self.split.tokens[flat].astype(np.int32))
    return StreamWindows(ids=np.where(valid, ids, 0).astype(np.int32), doc=doc,
                         offset=offset, valid=valid)
