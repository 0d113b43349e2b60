"""Decoding from an encoder-decoder: greedy, sampling or beam search, jitted.

Encoder-decoder runs (`translate_ids`, `translate_texts`): the sources are
encoded once and every decoder layer's cross-attention keys and values are
computed once (`EncoderDecoder.start_decoding`), then the same loop runs
`decode_step` for greedy decoding or sampling, or a beam search:

  tokens, scores = translate_ids(run.model_cfg, params, sources, max_new_tokens=64,
                                 start_id=eos, eos_id=eos, beam_size=4,
                                 length_penalty=0.6)

Beam search keeps the beam_size best unfinished hypotheses (prefix
log-probability); a candidate that ends in end-of-text among the beam_size
best candidates of a step is finished, scored log p / lp(length) with GNMT's
length penalty lp(n) = ((5 + n) / 6) ** length_penalty (Wu et al. 2016, eq.
14), and the best finished hypothesis is kept. The search stops once no
unfinished hypothesis can beat it: log-probabilities only fall, so with
length_penalty >= 0 an unfinished one scores at most log p / lp(max_new_tokens).
With length_penalty 0, beam_size 1 is greedy decoding, token for token. Scores
returned are the model's log-probability of each output (end-of-text
included), whatever the penalty.

Two constraints, as summarizers decode (Paulus et al. 2018; Hugging Face's
min_new_tokens and no_repeat_ngram_size), apply to every way of decoding:
min_new_tokens forbids end-of-text before that many tokens, and
no_repeat_ngram_size n forbids a token that would complete an n-gram the
output already holds. A forbidden token gets probability 0; the others keep
the model's log-probabilities (searching and scoring), or are renormalised
(sampling).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusedlm.research import models
from fusedlm.research.data.parallel_text import Specials
from fusedlm.research.inference.generation import is_int, until_eos
from fusedlm.research.inference.sampling import Sampling, sample
from fusedlm.research.models.config import ModelConfig


def translate_ids(
    model_cfg: ModelConfig,
    params: Any,  # the encoder-decoder's parameter tree
    sources: Sequence[Any],  # each a 1-D sequence of token ids, without the end token
    *,
    max_new_tokens: int,
    start_id: int,
    eos_id: int,
    pad_id: int = 0,
    beam_size: int | None = None,
    length_penalty: float = 0.0,
    min_new_tokens: int = 0,
    no_repeat_ngram_size: int = 0,
    sampling: Sampling = Sampling(),
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
  """(each source's output tokens, up to and including end-of-text; float32
  [batch] model log-probabilities of those outputs).

  Each source gets eos_id appended, as in training (research.data.parallel_text).
  beam_size None decodes by `sampling` (greedy by default); an int >= 1 runs
  beam search with `length_penalty` (>= 0). min_new_tokens and
  no_repeat_ngram_size (0 = off) constrain either (see the module docstring).

  Raises:
    ValueError: see `check_translation_request`.
  """
  rows = check_translation_request(
      model_cfg, sources, max_new_tokens=max_new_tokens, start_id=start_id,
      eos_id=eos_id, pad_id=pad_id, beam_size=beam_size, length_penalty=length_penalty,
      min_new_tokens=min_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size,
      sampling=sampling, seed=seed)
  width = max(len(row) for row in rows)
  # Round the source width up so that chunks of a corpus share one program.
  limit = model_cfg.max_len if model_cfg.position == "learned" else width + 15
  width = max(width, min(-(-width // 16) * 16, limit))
  source_ids = np.full((len(rows), width), pad_id, np.int32)  # [batch, width]
  for b, row in enumerate(rows):
    source_ids[b, :len(row)] = row
  mask = np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]
  constraints = Constraints(min_new_tokens, no_repeat_ngram_size)
  run = _compiled_seq2seq(model_cfg, sampling, beam_size, float(length_penalty),
                          max_new_tokens, constraints)
  tokens, scores = run(params, source_ids, mask, jax.random.key(seed),
                       np.int32(start_id), np.int32(eos_id), np.int32(pad_id))
  return [until_eos(row, eos_id) for row in np.asarray(tokens)], np.asarray(scores)


def check_translation_request(
    model_cfg: ModelConfig, sources, *, max_new_tokens: int, start_id: int, eos_id: int,
    pad_id: int = 0, beam_size: int | None = None, length_penalty: float = 0.0,
    min_new_tokens: int = 0, no_repeat_ngram_size: int = 0,
    sampling: Sampling = Sampling(), seed: int = 0,
) -> list[np.ndarray]:  # the sources as int32 [n_i + 1], end token appended
  """`translate_ids`' argument checks alone, to run before loading parameters.

  Raises:
    ValueError: a model that is not an encoder-decoder, max_new_tokens < 1 or
      past the learned positions (the message says the limit), no sources, an
      empty source, a source (+ its end token) longer than the positions, a
      token id outside the vocabulary, a bad beam size or length penalty,
      min_new_tokens outside [0, max_new_tokens], a negative
      no_repeat_ngram_size, or sampling together with beam search.
  """
  if model_cfg.kind != "encoder_decoder":
    raise ValueError(f"translation needs an encoder-decoder checkpoint; this one is a"
                     f" {model_cfg.kind} (kind={model_cfg.kind!r}).")
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling must be a research.inference.sampling.Sampling, got {sampling!r}.")
  if not is_int(seed):
    raise ValueError(f"seed must be an int, got {seed!r}.")
  learned = model_cfg.position == "learned"
  if not is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
  if learned and max_new_tokens > model_cfg.max_len:
    raise ValueError(f"max_new_tokens ({max_new_tokens}) exceeds the model's"
                     f" {model_cfg.max_len} learned target positions (max_len).")
  if beam_size is not None:
    if not is_int(beam_size) or beam_size < 1:
      raise ValueError(f"beam_size must be an int >= 1 (or None), got {beam_size!r}.")
    if not sampling.greedy:
      raise ValueError("beam search is deterministic: give beam_size or a sampling"
                       " temperature, not both.")
  if not isinstance(length_penalty, (int, float)) or not 0.0 <= length_penalty < 1e3:
    raise ValueError(f"length_penalty must be a number >= 0, got {length_penalty!r}.")
  if not is_int(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens:
    raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens ="
                     f" {max_new_tokens}], got {min_new_tokens!r}.")
  if not is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
    raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0 = off), got"
                     f" {no_repeat_ngram_size!r}.")
  vocab = model_cfg.vocab_size
  for name, token in (("start_id", start_id), ("eos_id", eos_id), ("pad_id", pad_id)):
    if not is_int(token) or not 0 <= token < vocab:
      raise ValueError(f"{name} ({token!r}) is not a token id of this model:"
                       f" ids run from 0 to {vocab - 1} (vocab_size {vocab}).")
  if isinstance(sources, np.ndarray) and sources.ndim == 1:
    raise ValueError("sources must be a list of 1-D token arrays, got one 1-D array.")
  if len(sources) == 0:
    raise ValueError("no sources: pass at least one.")
  rows = []
  for i, source in enumerate(sources):
    row = np.asarray(source)
    if row.ndim != 1 or row.size == 0:
      raise ValueError(f"source {i} must be a non-empty 1-D sequence of token ids,"
                       f" got shape {row.shape}.")
    if not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f"source {i} has dtype {row.dtype}; token ids must be integers.")
    bad = (row < 0) | (row >= vocab)
    if bad.any():
      raise ValueError(f"source {i} holds token id {int(row[np.argmax(bad)])}, outside"
                       f" [0, {vocab}) (vocab_size {vocab}).")
    rows.append(row.astype(np.int32))
    if learned and row.size + 1 > model_cfg.max_len:
      raise ValueError(f"source {i} is {row.size} tokens + the end token ="
                       f" {row.size + 1}, past the model's {model_cfg.max_len} learned"
                       " positions (max_len); shorten it.")
  return [np.append(row, np.int32(eos_id)).astype(np.int32) for row in rows]


def translate_texts(run, params: Any, texts: Sequence[str], *,
                    max_new_tokens: int | None = None, batch_size: int = 64,
                    **options) -> tuple[list[str], np.ndarray]:
  """(translations, float32 [n] log-probabilities) of `texts` with a seq2seq run.

  Decodes in chunks of batch_size (the last chunk padded, so every chunk runs
  one compiled program). max_new_tokens None = the model's max_len. options:
  beam_size, length_penalty, min_new_tokens, no_repeat_ngram_size, sampling,
  seed (see `translate_ids`).
  """
  if isinstance(texts, str):
    raise ValueError(f"texts must be a list of strings, got the string {texts!r}.")
  tokenizer = run.tokenizer
  specials = Specials.of(tokenizer)
  if max_new_tokens is None:
    max_new_tokens = run.model_cfg.max_len
  ids = tokenizer.encode_batch(list(texts))
  for i, (text, row) in enumerate(zip(texts, ids)):
    if row.size == 0:
      raise ValueError(f"text {i} ({text!r}) is empty: there is nothing to translate.")
  outputs, scores = [], []
  for start in range(0, len(ids), batch_size):
    chunk = ids[start:start + batch_size]
    padded = chunk + [chunk[0]] * (batch_size - len(chunk)) if len(ids) > batch_size else chunk
    tokens, chunk_scores = translate_ids(
        run.model_cfg, params, padded, max_new_tokens=max_new_tokens,
        start_id=specials.start, eos_id=specials.end, pad_id=specials.pad, **options)
    outputs += tokens[:len(chunk)]
    scores.append(chunk_scores[:len(chunk)])
  texts_out = [tokenizer.decode(t[:-1] if t.size and t[-1] == specials.end else t,
                                skip_special_tokens=True).strip() for t in outputs]
  return texts_out, np.concatenate(scores)


@dataclasses.dataclass(frozen=True)
class Constraints:
  """What decoding may not produce (0 = no constraint)."""

  min_new_tokens: int = 0  # end-of-text is forbidden before this many tokens
  no_repeat_ngram_size: int = 0  # no n-gram of this size twice in an output

  def apply(self, log_p, out, t, eos_id):
    """log_p [rows, V] of the token at position t, with forbidden tokens at -inf.

    out [rows, L] holds each row's tokens at positions < t (the rest unread).
    """
    if self.min_new_tokens:
      log_p = log_p.at[:, eos_id].set(jnp.where(t < self.min_new_tokens, -jnp.inf,
                                                log_p[:, eos_id]))
    n = self.no_repeat_ngram_size
    if n:
      log_p = jnp.where(repeated_ngram_tokens(out, t, n, log_p.shape[-1]), -jnp.inf, log_p)
    return log_p


def repeated_ngram_tokens(out, t, n: int, vocab: int):
  """bool [rows, vocab]: the tokens that, at position t, would complete an
  n-gram that out[:, :t] already holds (its last n - 1 tokens seen before,
  followed by that token)."""
  rows, length = out.shape
  if n < 1 or length < n:
    return jnp.zeros((rows, vocab), jnp.bool_)
  starts = length - n + 1  # candidate n-grams out[:, i:i + n]
  seen = jnp.ones((rows, starts), jnp.bool_)
  if n > 1:
    prefix = lax.dynamic_slice_in_dim(out, jnp.maximum(t - n + 1, 0), n - 1, axis=1)
    grams = jnp.stack([out[:, j:j + starts] for j in range(n - 1)], -1)  # [rows, starts, n-1]
    seen = jnp.all(grams == prefix[:, None, :], axis=-1)
  seen &= (jnp.arange(starts) + n - 1 < t)[None] & (t >= n - 1)  # whole n-gram before t
  follower = out[:, n - 1:]  # [rows, starts]: the token that ended each n-gram
  banned = jnp.zeros((rows, vocab), jnp.bool_)
  return banned.at[jnp.arange(rows)[:, None], follower].max(seen)


def length_penalty_of(length, alpha: float):
  """GNMT's lp(n) = ((5 + n) / 6) ** alpha; 1 for alpha 0."""
  return ((5.0 + length) / 6.0) ** alpha


@functools.lru_cache(maxsize=32)
def _compiled_seq2seq(model_cfg: ModelConfig, sampling: Sampling, beam_size: int | None,
                      length_penalty: float, max_new_tokens: int,
                      constraints: Constraints = Constraints()) -> Callable:
  """The jitted encode + decoding loop (greedy / sampling, or beam search)."""
  model = models.build_model(model_cfg)
  steps = max_new_tokens

  def start(params, source_ids, source_mask, start_id):
    starts = jnp.full((source_ids.shape[0],), start_id, jnp.int32)
    return model.apply({"params": params}, source_ids, source_mask, starts,
                       max_len=steps, method="start_decoding")

  def step(params, token, cache):  # token [rows]
    return model.apply({"params": params}, token[:, None], cache, method="decode_step")

  def by_sampling(params, source_ids, source_mask, key, start_id, eos_id, pad_id):
    logits, cache = start(params, source_ids, source_mask, start_id)

    def choose(logits, t, done, out):  # -> token [B], its log-probability [B]
      model_log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
      allowed = constraints.apply(model_log_p, out, t, eos_id)
      token = sample(allowed, jax.random.fold_in(key, t), sampling)
      token = jnp.where(done, pad_id, token)
      log_p = jnp.take_along_axis(model_log_p, token[:, None], 1)[:, 0]
      return token, jnp.where(done, 0.0, log_p)

    batch = source_ids.shape[0]
    out = jnp.full((batch, steps), pad_id, jnp.int32)
    token, score = choose(logits[:, 0], 0, jnp.zeros((batch,), jnp.bool_), out)
    out = out.at[:, 0].set(token)

    def unfinished(state):
      t, _, _, _, _, done = state
      return (t < steps) & ~jnp.all(done)

    def decode(state):
      t, token, cache, out, score, done = state
      logits, cache = step(params, token, cache)
      token, log_p = choose(logits[:, 0], t, done, out)
      out = lax.dynamic_update_slice_in_dim(out, token[:, None], t, axis=1)
      return t + 1, token, cache, out, score + log_p, done | (token == eos_id)

    state = (jnp.int32(1), token, cache, out, score, token == eos_id)
    _, _, _, out, score, _ = lax.while_loop(unfinished, decode, state)
    return out, score

  def by_beam_search(params, source_ids, source_mask, key, start_id, eos_id, pad_id):
    del key
    k = beam_size
    logits, cache = start(params, source_ids, source_mask, start_id)  # once per source
    batch, vocab = source_ids.shape[0], logits.shape[-1]
    # Beams are rows b * k + j; the source's keys/values are copied to each beam.
    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
    logits = jnp.repeat(logits[:, 0], k, axis=0)  # [B*k, V]
    # One live beam at first: the others start at -inf and never win.
    alive_score = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None].repeat(batch, 0)
    neg = jnp.full((batch,), -jnp.inf)
    state = dict(t=jnp.int32(0), logits=logits, cache=cache,
                 alive=jnp.full((batch, k, steps), pad_id, jnp.int32), alive_score=alive_score,
                 best=jnp.full((batch, steps), pad_id, jnp.int32), best_score=neg,
                 best_log_p=neg)

    def unfinished(s):
      bound = s["alive_score"][:, 0] / length_penalty_of(steps, length_penalty)
      return (s["t"] < steps) & ~jnp.all(s["best_score"] >= bound)

    def search(s):
      t = s["t"]
      log_p = constraints.apply(jax.nn.log_softmax(s["logits"].astype(jnp.float32)),
                                s["alive"].reshape(batch * k, steps), t, eos_id)
      log_p = log_p.reshape(batch, k, vocab)
      candidates = (s["alive_score"][:, :, None] + log_p).reshape(batch, k * vocab)
      score, index = lax.top_k(candidates, 2 * k)  # [B, 2k]: at most k end in eos
      beam, token = index // vocab, index % vocab
      seqs = jnp.take_along_axis(s["alive"], beam[:, :, None], axis=1)  # [B, 2k, L]
      seqs = lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], t, axis=2)
      ends = token == eos_id
      # Only the k best candidates may finish, so that beam 1 is greedy.
      finished = jnp.where(ends & (jnp.arange(2 * k) < k), score, -jnp.inf)
      penalized = finished / length_penalty_of(t + 1, length_penalty)
      pick = jnp.argmax(penalized, axis=1)  # [B]
      new_best = jnp.take_along_axis(penalized, pick[:, None], 1)[:, 0]
      better = new_best > s["best_score"]
      best = jnp.where(better[:, None], seqs[jnp.arange(batch), pick], s["best"])
      best_log_p = jnp.where(better, score[jnp.arange(batch), pick], s["best_log_p"])
      alive_score, keep = lax.top_k(jnp.where(ends, -jnp.inf, score), k)  # [B, k]
      alive = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
      rows = (jnp.arange(batch)[:, None] * k
              + jnp.take_along_axis(beam, keep, 1)).reshape(-1)
      cache = s["cache"].replace(
          layers=jax.tree.map(lambda x: x[rows], s["cache"].layers),
          lengths=s["cache"].lengths[rows])
      logits, cache = step(params, jnp.take_along_axis(token, keep, 1).reshape(-1), cache)
      return dict(t=t + 1, logits=logits[:, 0], cache=cache, alive=alive,
                  alive_score=alive_score, best=best,
                  best_score=jnp.maximum(new_best, s["best_score"]), best_log_p=best_log_p)

    s = lax.while_loop(unfinished, search, state)
    found = s["best_score"] > -jnp.inf  # else the best unfinished hypothesis
    out = jnp.where(found[:, None], s["best"], s["alive"][:, 0])
    return out, jnp.where(found, s["best_log_p"], s["alive_score"][:, 0])

  return jax.jit(by_sampling if beam_size is None else by_beam_search)
