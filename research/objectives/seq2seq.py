"""Sequence-to-sequence: teacher-forced cross-entropy on the target tokens of
(source, target) pairs, with an encoder-decoder; BLEU and chrF by decoding.

An experiment starts from `run_config.defaults("seq2seq")` (pretraining's,
with a parallel-text data section and the decoding settings):

  config.data.corpus      "synthetic": the built-in synthetic translation task
                          (research.data.synthetic_translation); or a pairs
                          file (.tsv / .csv / .jsonl), or the source side of two
                          line-aligned text files (with data.target_file)
  config.label_smoothing  spread over the vocabulary (Szegedy et al. 2016); 0.1
                          in Vaswani et al. 2017. Training only: evaluation
                          reports the plain cross-entropy and its perplexity
  config.decode           beam_size, length_penalty, max_new_tokens,
                          min_new_tokens, no_repeat_ngram_size of the BLEU
                          evaluation (fusedlm evaluate) and fusedlm translate

`fusedlm evaluate` on a seq2seq run reports loss / perplexity / accuracy of
the target tokens and then decodes the evaluation split: sacrebleu's corpus
BLEU and chrF, against every reference of a source (a source translated
several ways, as in Tatoeba, is decoded once and scored against all its
translations), with the hypotheses written one a line beside the JSON.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fusedlm.research import data as data_lib
from fusedlm.research.data import parallel_text, stdlib_summaries, synthetic_translation
from fusedlm.research.inference import seq2seq_decoding
from fusedlm.research.objectives.metrics import row_weights, safe_mean
from fusedlm.research.objectives.objective import Objective, pretraining_model_config

SYNTHETIC = "synthetic"
# Built-in pair sets, by config.data.corpus name: nothing to download.
BUILT_IN = {SYNTHETIC: synthetic_translation.synthetic_pairs,
            stdlib_summaries.NAME: stdlib_summaries.summary_pairs}


def extend_defaults(config):
  """Pretraining's defaults (run_config.defaults) made a seq2seq run config's:
  every field with its default, i.e. its schema."""
  del config["nsp"]
  d = config.data
  for key in ("mask_prob", "whole_word_masking"):
    del d[key]
  d.corpus = SYNTHETIC  # "synthetic" (built in) | pairs file | source side of two files
  d.target_file = ""  # target side, line-aligned with corpus; "" = corpus holds both
  d.source_field = "source"  # field / column name ("0", "1", ... without a header)
  d.target_field = "target"
  d.header = True  # a .tsv / .csv's first line names its columns
  d.validation = ""  # held-out pairs (same format); "" = validation_fraction by source hash
  d.validation_target_file = ""  # its target side, for line-aligned files
  d.validation_fraction = 0.05
  d.tokenizer = "bpe"  # one vocabulary for both languages, trained on both sides
  d.vocab_size = 8000
  d.seq_len = 64  # tokens per side of a row (+ the end token); <= model max_len
  d.too_long = "error"  # a pair past seq_len: "error" (names it) | "skip"
  d.packing = False  # several pairs per row (segment ids), or one pair per row
  config.label_smoothing = 0.1
  config.decode = ml_collections.ConfigDict()
  config.decode.beam_size = 4  # 0 = greedy decoding
  config.decode.length_penalty = 0.6  # GNMT's alpha (Wu et al. 2016)
  config.decode.max_new_tokens = 0  # 0 = the model's max_len
  config.decode.min_new_tokens = 0  # no end-of-text before this many tokens
  config.decode.no_repeat_ngram_size = 0  # > 0: no n-gram of this size twice; 0 = off
  return config


def seq2seq_loss(
    logits,  # [batch, tgt_len, vocab] float32
    batch: dict,  # targets, loss_mask [B, T]; label_smoothing, weights [B]
):
  """Cross-entropy of the targets, label-smoothed by batch["label_smoothing"].

  With smoothing eps the target distribution puts eps / vocab on every token
  and 1 - eps more on the true one: loss = (1 - eps) nll + eps mean_v(-log p_v).
  """
  targets = batch["targets"]
  rows = targets.shape[0]
  weights = batch["loss_mask"].astype(jnp.float32) * row_weights(batch, rows)[:, None]
  eps = batch.get("label_smoothing")
  eps = jnp.zeros((rows,), jnp.float32) if eps is None else eps.astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  used = weights > 0
  safe = jnp.where(used, targets, 0)
  nll = -jnp.take_along_axis(log_p, safe[..., None], -1)[..., 0]
  loss = (1.0 - eps[:, None]) * nll - eps[:, None] * jnp.mean(log_p, axis=-1)
  hit = (jnp.argmax(logits, -1) == safe).astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(jnp.where(used, loss * weights, 0.0)),
          "correct": jnp.sum(jnp.where(used, hit * weights, 0.0)),
          "count": jnp.sum(weights)}
  return safe_mean(sums["loss_sum"], sums["count"]), sums


def outputs(model, variables, batch: dict, *, deterministic: bool = True, rngs=None):
  """Logits [B, T, V] of batch["target_inputs"] given batch["source_ids"]."""
  return model.apply(
      variables, batch["source_ids"], batch["target_inputs"],
      source_padding_mask=batch["source_padding_mask"],
      source_positions=batch.get("source_positions"),
      target_positions=batch.get("target_positions"),
      source_segment_ids=batch.get("source_segment_ids"),
      target_segment_ids=batch.get("target_segment_ids"),
      deterministic=deterministic, rngs=rngs)


def _pairs(d, corpus: str, target_file: str) -> parallel_text.ParallelText:
  return parallel_text.load_parallel_text(
      corpus, target_path=target_file or None, source_field=d.source_field,
      target_field=d.target_field, header=d.header)


def pairs_of(config) -> tuple[parallel_text.ParallelText, parallel_text.ParallelText]:
  """(train, validation) pairs of config.data."""
  d = config.data
  if d.corpus in BUILT_IN:
    return parallel_text.split_pairs(BUILT_IN[d.corpus](), d.validation_fraction)
  train = _pairs(d, d.corpus, d.target_file)
  if d.validation:
    return train, _pairs(d, d.validation, d.validation_target_file)
  return parallel_text.split_pairs(train, d.validation_fraction)


def _batches(config, pairs, tokenizer, batch_size: int, label_smoothing: float):
  d = config.data
  return parallel_text.Seq2SeqBatches(
      pairs, tokenizer, d.seq_len, batch_size, config.train.seed, packing=d.packing,
      label_smoothing=label_smoothing, too_long=d.too_long,
      process_index=jax.process_index(), process_count=jax.process_count())


def train_data(config, tokenizer):
  """The tokenizer (trained on both sides of the training pairs, cached) and
  the train / validation batch makers."""
  from fusedlm.research.data import run_data  # run_data imports the data layer only; keep it lazy
  train, validation = pairs_of(config)
  if tokenizer is None:
    d = config.data
    vocab = None if d.tokenizer == "byte" else d.vocab_size
    tokenizer = data_lib.get_or_train_tokenizer(
        d.tokenizer, train.as_corpus(validation), vocab, run_data.cache_dir(config))
  size = config.train.batch_size
  return run_data.RunData(
      tokenizer, _batches(config, train, tokenizer, size, config.label_smoothing),
      _batches(config, validation, tokenizer, size, 0.0), train.name)


def eval_data(config, tokenizer, batch_size: int, data: str | None = None,
              label_names=None):
  """(batch maker, description): the validation split, or a pairs file `data`
  read with the run's fields (a BUILT_IN name: that task's validation split)."""
  del label_names
  if data is None:
    _, pairs = pairs_of(config)
    what = f"{pairs.name} validation split"
  elif data in BUILT_IN:
    _, pairs = parallel_text.split_pairs(BUILT_IN[data](), config.data.validation_fraction)
    what = f"{pairs.name} validation split"
  else:
    pairs = _pairs(config.data, data, "")
    what = str(data)
  batches = _batches(config, pairs, tokenizer, batch_size, 0.0)
  return batches, parallel_text.describe(batches, what)


def corpus_scores(hypotheses: list[str], references: list[list[str]]) -> dict:
  """sacrebleu's corpus BLEU and chrF; references[i] holds source i's translations."""
  import sacrebleu  # only scoring needs it
  most = max(len(r) for r in references)
  streams = [[r[j] if j < len(r) else None for r in references] for j in range(most)]
  bleu = sacrebleu.metrics.BLEU()
  chrf = sacrebleu.metrics.CHRF()
  bleu_score = bleu.corpus_score(hypotheses, streams)
  return {"bleu": bleu_score.score, "chrf": chrf.corpus_score(hypotheses, streams).score,
          "bleu_brevity_penalty": bleu_score.bp, "sources": len(hypotheses),
          "references": sum(len(r) for r in references),
          "bleu_signature": str(bleu.get_signature())}


def decode_settings(config) -> dict:
  """translate_texts' options from config.decode (a run saved before a field
  existed decodes without it)."""
  decode = config.decode
  beam = decode.beam_size
  return dict(beam_size=beam if beam > 0 else None,
              length_penalty=float(decode.length_penalty) if beam > 0 else 0.0,
              max_new_tokens=decode.max_new_tokens or None,
              min_new_tokens=decode.get("min_new_tokens", 0),
              no_repeat_ngram_size=decode.get("no_repeat_ngram_size", 0))


def describe_decoding(settings: dict) -> str:
  """'beam 4, length penalty 0.6[, at least N tokens][, no repeated 3-grams]'."""
  text = (f"beam {settings['beam_size']}, length penalty {settings['length_penalty']}"
          if settings["beam_size"] else "greedy")
  if settings.get("min_new_tokens"):
    text += f", at least {settings['min_new_tokens']} tokens"
  if settings.get("no_repeat_ngram_size"):
    text += f", no repeated {settings['no_repeat_ngram_size']}-grams"
  return text


def decoding_evaluation(score):
  """An extra_evaluation that decodes the split and scores it with
  score(hypotheses, references per hypothesis) -> metrics."""

  def extra_evaluation(run, params, batches: parallel_text.Seq2SeqBatches,
                       max_batches: int | None = None) -> dict:
    """Decodes every distinct source of the evaluation pairs (the first
    max_batches * batch_size pairs with max_batches) and scores the outputs
    against all of that source's targets."""
    pairs, batch_size = batches.pairs, batches.batch_size
    limit = len(pairs) if max_batches is None else min(len(pairs), max_batches * batch_size)
    by_source: dict[str, list[str]] = {}
    for source, target in zip(pairs.sources[:limit], pairs.targets[:limit]):
      by_source.setdefault(source, []).append(target)
    settings = decode_settings(run.config)
    hypotheses, _ = seq2seq_decoding.translate_texts(
        run, params, list(by_source), batch_size=batch_size, **settings)
    metrics = score(hypotheses, list(by_source.values()))
    metrics["decoding"] = describe_decoding(settings)
    return {"metrics": metrics, "outputs": {"hypotheses": hypotheses}}

  return extra_evaluation


def model_config(config, vocab_size, pretrained=None, num_labels: int = 0):
  del pretrained, num_labels
  return pretraining_model_config(config, vocab_size, kind="encoder_decoder")


def _validate(config) -> None:
  d = config.data
  if d.too_long not in parallel_text.TOO_LONG:
    raise ValueError(f"config.data.too_long must be one of {parallel_text.TOO_LONG},"
                     f" got {d.too_long!r}.")
  if not 0.0 < d.validation_fraction < 1.0:
    raise ValueError("config.data.validation_fraction must be in (0, 1), got"
                     f" {d.validation_fraction}.")
  if d.seq_len < 2:
    raise ValueError(f"config.data.seq_len must be >= 2, got {d.seq_len}.")
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ValueError(f"config.label_smoothing must be in [0, 1), got"
                     f" {config.label_smoothing}.")
  if d.target_file and d.corpus in BUILT_IN:
    raise ValueError("config.data.target_file goes with a source-side text file, not"
                     f" the built-in task {d.corpus!r}.")
  decode = config.decode
  for key in ("beam_size", "length_penalty", "min_new_tokens", "no_repeat_ngram_size"):
    if decode[key] < 0:
      raise ValueError(f"config.decode.{key} must be >= 0, got {decode[key]}.")
  if decode.max_new_tokens and decode.min_new_tokens > decode.max_new_tokens:
    raise ValueError(f"config.decode.min_new_tokens ({decode.min_new_tokens}) exceeds"
                     f" max_new_tokens ({decode.max_new_tokens}).")


OBJECTIVE = Objective(
    name="seq2seq",
    fine_tunes=False,
    model_config=model_config,
    outputs=outputs,
    loss=lambda outputs, batch, cfg: seq2seq_loss(outputs, batch),
    train_data=train_data,
    eval_data=eval_data,
    validate=_validate,
    report_keys=("loss", "perplexity", "accuracy", "bleu", "chrf"),
    config_defaults=extend_defaults,
    extra_evaluation=decoding_evaluation(corpus_scores),
    text_scores=corpus_scores,
)
