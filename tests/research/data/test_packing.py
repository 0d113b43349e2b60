"""The separator-joined stream gathers exactly what an explicit concatenation holds."""

import numpy as np

from fusedlm.research.data.packing import SeparatedStream
from tests.research.data.token_data import explicit_stream, split_of


def test_gather_matches_the_explicit_stream_including_empty_documents():
  split = split_of([3, 0, 5, 1, 7])
  stream = SeparatedStream(split, separator_id=2)
  ids, doc, offset = explicit_stream(split, 2)
  assert stream.length == len(ids) == 21
  starts = np.array([0, 4, 9, 17])
  windows = stream.gather(starts, 6)
  for row, start in enumerate(starts):
    end = min(start + 6, len(ids))
    n = end - start
    np.testing.assert_array_equal(windows.ids[row, :n], ids[start:end])
    np.testing.assert_array_equal(windows.doc[row, :n], doc[start:end])
    np.testing.assert_array_equal(windows.offset[row, :n], offset[start:end])
    np.testing.assert_array_equal(windows.valid[row], np.arange(6) < n)
  np.testing.assert_array_equal(windows.ids[3, 4:], [0, 0])
