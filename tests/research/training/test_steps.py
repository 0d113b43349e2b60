"""The compiled train step: chunking the output layer keeps the logits from materialising whole.

Compiled (not run) for this machine's device, with XLA's memory analysis:
the plain step holds the [batch, seq, vocab] float32 logits (and their
gradient); with logits_chunk it needs at least one logits' worth less.
`fusedlm bench-train --compile_for=h100` states the same for GPT-2 small
on an H100 (BENCHMARKS.md).
"""

import jax
import jax.numpy as jnp

from fusedlm.research import models, objectives, run_config
from fusedlm.research.models import config as model_config
from fusedlm.research.training import optimizer
from fusedlm.research.training import steps as steps_lib

BATCH, SEQ, VOCAB = 8, 128, 4096


def compiled_peak_bytes(logits_chunk: int) -> int:
  cfg = model_config.tiny_gpt().replace(vocab_size=VOCAB, dtype="float32", attention="xla",
                                        dropout=0.0, logits_chunk=logits_chunk)
  tx = optimizer.build_optimizer(run_config.defaults().optimizer, 100)
  state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype),
                                 steps_lib.abstract(cfg, tx, 0))
  batch = {name: jax.ShapeDtypeStruct((1, BATCH, SEQ), dtype) for name, dtype in [
      ("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32),
      ("positions", jnp.int32), ("segment_ids", jnp.int32)]}
  p_train, _ = steps_lib.pmapped_steps(models.build_model(cfg), tx, objectives.get("causal"),
                                       jax.local_devices()[:1])
  stats = p_train.lower(state, batch).compile().memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def test_chunked_logits_need_at_least_one_logits_less_memory():
  logits_bytes = BATCH * SEQ * VOCAB * 4  # float32
  plain, chunked = compiled_peak_bytes(0), compiled_peak_bytes(128)
  assert plain - chunked >= logits_bytes, (plain, chunked, logits_bytes)
