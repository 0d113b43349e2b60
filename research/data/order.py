"""Which examples make up batch `step`: a pure function of (seed, step).

Every batch maker enumerates its examples 0..num_examples-1 (packed windows,
document chunks, labelled rows) and asks a `BatchSchedule` which of them form its
share of a batch. Training order: epoch = step // steps_per_epoch; the examples
are permuted by a numpy Generator seeded with (seed, epoch), and batch `step`
takes the next `batch_size` of that permutation (the remainder of an epoch is
dropped, so every batch is full). Resuming from a checkpoint needs only `step`.

With several processes (hosts), process p takes rows
[p * per_process, (p + 1) * per_process) of every global batch, and only reads
the data of those rows. Concatenating all processes' batches in process order
gives the single-process batch.

Evaluation walks examples 0..num_examples-1 once, in order; the last batch is
padded and `weights` marks padded rows with 0.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# Stream tags keep the random draws of different purposes independent.
PERMUTATION_STREAM = 0
EXAMPLE_STREAM = 1
EVAL_STREAM = 2


def example_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
  """A Generator that depends only on (seed, stream, keys), for per-example draws."""
  return np.random.default_rng([seed, stream, *keys])


@dataclasses.dataclass(frozen=True)
class BatchSchedule:
  """Maps (step or eval batch index) to this process's example indices.

  Attributes:
    num_examples: examples in one epoch.
    batch_size: global batch size (all processes together).
    seed: shuffling seed.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing each batch.
  """

  num_examples: int
  batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}")
    if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} is not in "
                       f"[0, process_count={self.process_count})")
    if self.batch_size % self.process_count:
      raise ValueError(f"batch_size {self.batch_size} is not divisible by "
                       f"process_count {self.process_count}")
    if self.num_examples < 1:
      raise ValueError("no examples: the split is empty or too short")

  @property
  def per_process(self) -> int:
    """Rows of each batch that this process returns."""
    return self.batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    """Full batches per epoch.

    Raises:
      ValueError: fewer examples than one batch (evaluation still works).
    """
    if self.num_examples < self.batch_size:
      raise ValueError(f"only {self.num_examples} examples, fewer than one training "
                       f"batch of {self.batch_size}: use a smaller batch or more data")
    return self.num_examples // self.batch_size

  @property
  def num_eval_batches(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def epoch_of(self, step: int) -> int:
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    return step // self.steps_per_epoch

  def permutation(self, epoch: int) -> np.ndarray:
    """int64 [num_examples]: the example order of `epoch`."""
    return _permutation(self.seed, epoch, self.num_examples)

  def global_rows(self) -> np.ndarray:
    """int64 [per_process]: this process's row numbers within a global batch."""
    start = self.process_index * self.per_process
    return np.arange(start, start + self.per_process)

  def train_examples(self, step: int) -> np.ndarray:
    """int64 [per_process]: example indices of this process's rows of batch `step`."""
    epoch = self.epoch_of(step)
    offset = (step % self.steps_per_epoch) * self.batch_size
    return self.permutation(epoch)[offset + self.global_rows()]

  def eval_examples(self, batch_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices int64 [per_process], weights float32 [per_process]).

    Rows past the last example repeat example 0 (so a model sees ordinary input,
    never an all-padding row) and get weight 0.
    """
    if not 0 <= batch_index < self.num_eval_batches:
      raise ValueError(f"eval batch {batch_index} out of range "
                       f"[0, {self.num_eval_batches})")
    examples = batch_index * self.batch_size + self.global_rows()
    valid = examples < self.num_examples
    return np.where(valid, examples, 0), valid.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  # Memoized: consecutive steps of an epoch share one permutation. Read-only so a
  # caller cannot corrupt the cached copy.
  order = np.random.default_rng([seed, PERMUTATION_STREAM, epoch]).permutation(num_examples)
  order.flags.writeable = False
  return order
