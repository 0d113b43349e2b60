"""Text generation from a decoder: batched, jitted, with the model's KV cache.

  run = checkpoint.open_run("runs/tiny_gpt")
  step, params = run.restore_params()
  tokens = generate(run.model_cfg, params, [np.array([5, 17, 2]), np.array([9])],
                    max_new_tokens=32, sampling=Sampling(temperature=0.8, top_k=40),
                    seed=0, eos_id=run.tokenizer.eos_id)  # new tokens of each prompt
  texts = generate_text(run, params, ["Once upon", "The"], max_new_tokens=32)

Prompts of different lengths are right-padded to the longest and decoded
together: one jitted program runs `Decoder.prefill` over the prompts, then a
`lax.while_loop` of `Decoder.decode_step`, one token per row per step, that
stops as soon as every row has emitted end-of-text (or after max_new_tokens).
A finished row keeps decoding pad tokens, which are dropped. Step t draws with
`jax.random.fold_in(key(seed), t)`, so a seed reproduces a batch's samples.
The program is compiled once per (model config, sampling, max_new_tokens,
cache length) and batch size.

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
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from research import models
from research.models.config import ModelConfig
from research.sampling import Sampling, sample

if TYPE_CHECKING:
  from research.data import Tokenizer
  from research.checkpoint import SavedRun

NO_TOKEN = -1  # eos_id inside the program when there is none: never sampled


def generate(
    model_cfg: ModelConfig,
    params: Any,  # the decoder's parameter tree (numpy or jax arrays)
    prompts: Sequence[Any],  # each a 1-D sequence of int token ids, any length
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> list[np.ndarray]:  # per prompt: int32 [n_i], n_i <= max_new_tokens
  """The tokens generated after each prompt (the prompt itself not included).

  A row stops after its first eos_id, which is kept as its last token; without
  one it gets max_new_tokens tokens. An empty prompt starts from eos_id (as
  GPT-2 starts unconditional samples from <|endoftext|>). pad_id fills the
  padding of short prompts and what finished rows feed back; it is never
  returned.

  Raises:
    ValueError: see `check_request`.
  """
  rows = check_request(model_cfg, prompts, max_new_tokens=max_new_tokens,
                       sampling=sampling, seed=seed, eos_id=eos_id, pad_id=pad_id)
  lengths = np.array([len(row) for row in rows], np.int32)
  longest = int(lengths.max())
  cache_len = longest + max_new_tokens
  input_ids = np.full((len(rows), longest), pad_id, np.int32)  # [batch, longest]
  for b, row in enumerate(rows):
    input_ids[b, :len(row)] = row
  run = _compiled(model_cfg, sampling, max_new_tokens, cache_len)
  out = np.asarray(run(
      params, input_ids, lengths, jax.random.key(seed),
      np.int32(NO_TOKEN if eos_id is None else eos_id), np.int32(pad_id)))
  return [_until_eos(row, eos_id) for row in out]


def check_request(
    model_cfg: ModelConfig,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> list[np.ndarray]:  # the prompts as int32 [n_i >= 1], empty ones = [eos_id]
  """`generate`'s argument checks alone, to run before loading any parameters.

  Raises:
    ValueError: an encoder config, max_new_tokens < 1, no prompts, an empty
      prompt without eos_id, a token id outside [0, vocab_size), or prompt +
      new tokens longer than a learned position table.
  """
  if model_cfg.kind == "encoder_decoder":
    raise ValueError(
        "this is an encoder-decoder (seq2seq) checkpoint: it continues no prompt but"
        " translates a source; use research.translate (decoding.translate_texts).")
  if model_cfg.kind != "decoder":
    raise ValueError(
        "generation needs a decoder (causal LM) checkpoint; this one is an"
        f" {model_cfg.kind} (kind={model_cfg.kind!r}), which predicts masked"
        " tokens, not the next one.")
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling must be a research.sampling.Sampling, got {sampling!r}.")
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
  if not _is_int(seed):
    raise ValueError(f"seed must be an int, got {seed!r}.")
  vocab = model_cfg.vocab_size
  for name, token in (("eos_id", eos_id), ("pad_id", pad_id)):
    if token is None and name == "eos_id":
      continue
    if not _is_int(token) or not 0 <= token < vocab:
      raise ValueError(f"{name} ({token!r}) is not a token id of this model:"
                       f" ids run from 0 to {vocab - 1} (vocab_size {vocab}).")
  rows = _check_prompts(prompts, vocab, eos_id)
  lengths = np.array([len(row) for row in rows], np.int32)
  longest = int(lengths.max())
  cache_len = longest + max_new_tokens
  if model_cfg.position == "learned" and cache_len > model_cfg.max_len:
    fit = model_cfg.max_len - longest
    room = (f"at most {fit} new tokens fit after it" if fit > 0 else
            f"shorten it to at most {model_cfg.max_len - 1} tokens")
    raise ValueError(
        f"the longest prompt (prompt {int(np.argmax(lengths))}, {longest} tokens) +"
        f" max_new_tokens ({max_new_tokens})"
        f" = {cache_len} tokens exceeds the model's {model_cfg.max_len} learned"
        f" positions (max_len); {room}.")
  return rows


def encode_prompts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
  """Token ids of each text (int32 [n_i]); "" gives an empty prompt."""
  if isinstance(texts, str):
    raise ValueError(f"texts must be a list of strings, got the string {texts!r}.")
  return tokenizer.encode_batch(list(texts)) if texts else []


def generate_text(
    run: SavedRun,
    params: Any,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    skip_special_tokens: bool = True,
) -> list[str]:
  """The continuation of each text, with the run's tokenizer; stops at its eos."""
  tokenizer = run.tokenizer
  tokens = generate(
      run.model_cfg, params, encode_prompts(tokenizer, texts),
      max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
      eos_id=tokenizer.eos_id, pad_id=default_pad_id(tokenizer))
  return [tokenizer.decode(t, skip_special_tokens=skip_special_tokens) for t in tokens]


def default_pad_id(tokenizer: Tokenizer) -> int:
  """The tokenizer's pad id, else its eos id, else 0 (pads are never read)."""
  for token in (tokenizer.pad_id, tokenizer.eos_id):
    if token is not None:
      return token
  return 0


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_prompts(prompts, vocab: int, eos_id: int | None) -> list[np.ndarray]:
  """Each prompt as int32 [n >= 1]; ValueError naming the first bad one."""
  if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
    raise ValueError("prompts must be a list of 1-D token arrays, got one 1-D array;"
                     " wrap a single prompt in a list.")
  if len(prompts) == 0:
    raise ValueError("no prompts: pass at least one (an empty one starts from eos_id).")
  rows = []
  for i, prompt in enumerate(prompts):
    row = np.asarray(prompt)
    if row.ndim != 1:
      raise ValueError(f"prompt {i} must be a 1-D sequence of token ids, got shape"
                       f" {row.shape}.")
    if row.size == 0:
      if eos_id is None:
        raise ValueError(f"prompt {i} is empty and there is no eos_id to start it"
                         " from; give it at least one token or pass eos_id.")
      row = np.array([eos_id])
    if not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f"prompt {i} has dtype {row.dtype}; token ids must be integers.")
    bad = (row < 0) | (row >= vocab)
    if bad.any():
      at = int(np.argmax(bad))
      raise ValueError(f"prompt {i} holds token id {int(row[at])} at position {at},"
                       f" outside [0, {vocab}) (vocab_size {vocab}).")
    rows.append(row.astype(np.int32))
  return rows


def _until_eos(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
  """tokens up to and including the first eos_id (all of them without one)."""
  if eos_id is not None:
    hits = np.flatnonzero(tokens == eos_id)
    if hits.size:
      return tokens[:hits[0] + 1]
  return tokens


@functools.lru_cache(maxsize=32)
def _compiled(model_cfg: ModelConfig, sampling: Sampling, max_new_tokens: int,
              cache_len: int) -> Callable:
  """The jitted prefill + decoding loop for one configuration (see `generate`)."""
  model = models.build_model(model_cfg)

  def run(
      params,
      input_ids,  # [batch, prompt_len] int32, right-padded
      lengths,  # [batch] int32
      key,  # PRNG key
      eos_id,  # int32 scalar; NO_TOKEN for none
      pad_id,  # int32 scalar
  ):  # -> [batch, max_new_tokens] int32; pad_id after a row's eos
    variables = {"params": params}
    logits, cache = model.apply(
        variables, input_ids, lengths, max_len=cache_len, method="prefill")
    token = sample(logits[:, 0], jax.random.fold_in(key, 0), sampling)  # [batch]
    out = jnp.full((input_ids.shape[0], max_new_tokens), pad_id, jnp.int32)
    out = out.at[:, 0].set(token)

    def unfinished(state):
      step, _, _, _, done = state
      return (step < max_new_tokens) & ~jnp.all(done)

    def decode(state):
      step, token, cache, out, done = state
      logits, cache = model.apply(
          variables, token[:, None], cache, method="decode_step")
      token = sample(logits[:, 0], jax.random.fold_in(key, step), sampling)
      token = jnp.where(done, pad_id, token)
      out = lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
      return step + 1, token, cache, out, done | (token == eos_id)

    state = (jnp.int32(1), token, cache, out, token == eos_id)
    return lax.while_loop(unfinished, decode, state)[3]

  return jax.jit(run)


# Encoder-decoder decoding.


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
    sampling: Sampling = Sampling(),
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
  """(each source's output tokens, up to and including end-of-text; float32
  [batch] model log-probabilities of those outputs).

  Each source gets eos_id appended, as in training (research.data.parallel_text).
  beam_size None decodes by `sampling` (greedy by default); an int >= 1 runs
  beam search with `length_penalty` (>= 0).

  Raises:
    ValueError: see `check_translation_request`.
  """
  rows = check_translation_request(
      model_cfg, sources, max_new_tokens=max_new_tokens, start_id=start_id,
      eos_id=eos_id, pad_id=pad_id, beam_size=beam_size, length_penalty=length_penalty,
      sampling=sampling, seed=seed)
  width = max(len(row) for row in rows)
  # Round the source width up so that chunks of a corpus share one program.
  limit = model_cfg.max_len if model_cfg.position == "learned" else width + 15
  width = max(width, min(-(-width // 16) * 16, limit))
  source_ids = np.full((len(rows), width), pad_id, np.int32)  # [batch, width]
  for b, row in enumerate(rows):
    source_ids[b, :len(row)] = row
  mask = np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]
  run = _compiled_seq2seq(model_cfg, sampling, beam_size, float(length_penalty),
                          max_new_tokens)
  tokens, scores = run(params, source_ids, mask, jax.random.key(seed),
                       np.int32(start_id), np.int32(eos_id), np.int32(pad_id))
  return [_until_eos(row, eos_id) for row in np.asarray(tokens)], np.asarray(scores)


def check_translation_request(
    model_cfg: ModelConfig, sources, *, max_new_tokens: int, start_id: int, eos_id: int,
    pad_id: int = 0, beam_size: int | None = None, length_penalty: float = 0.0,
    sampling: Sampling = Sampling(), seed: int = 0,
) -> list[np.ndarray]:  # the sources as int32 [n_i + 1], end token appended
  """`translate_ids`' argument checks alone, to run before loading parameters.

  Raises:
    ValueError: a model that is not an encoder-decoder, max_new_tokens < 1 or
      past the learned positions (the message says the limit), no sources, an
      empty source, a source (+ its end token) longer than the positions, a
      token id outside the vocabulary, a bad beam size or length penalty, or
      sampling together with beam search.
  """
  if model_cfg.kind != "encoder_decoder":
    raise ValueError(f"translation needs an encoder-decoder checkpoint; this one is a"
                     f" {model_cfg.kind} (kind={model_cfg.kind!r}).")
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling must be a research.sampling.Sampling, got {sampling!r}.")
  if not _is_int(seed):
    raise ValueError(f"seed must be an int, got {seed!r}.")
  learned = model_cfg.position == "learned"
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
  if learned and max_new_tokens > model_cfg.max_len:
    raise ValueError(f"max_new_tokens ({max_new_tokens}) exceeds the model's"
                     f" {model_cfg.max_len} learned target positions (max_len).")
  if beam_size is not None:
    if not _is_int(beam_size) or beam_size < 1:
      raise ValueError(f"beam_size must be an int >= 1 (or None), got {beam_size!r}.")
    if not sampling.greedy:
      raise ValueError("beam search is deterministic: give beam_size or a sampling"
                       " temperature, not both.")
  if not isinstance(length_penalty, (int, float)) or not 0.0 <= length_penalty < 1e3:
    raise ValueError(f"length_penalty must be a number >= 0, got {length_penalty!r}.")
  vocab = model_cfg.vocab_size
  for name, token in (("start_id", start_id), ("eos_id", eos_id), ("pad_id", pad_id)):
    if not _is_int(token) or not 0 <= token < vocab:
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


def translate_texts(run: SavedRun, params: Any, texts: Sequence[str], *,
                    max_new_tokens: int | None = None, batch_size: int = 64,
                    **options) -> tuple[list[str], np.ndarray]:
  """(translations, float32 [n] log-probabilities) of `texts` with a seq2seq run.

  Decodes in chunks of batch_size (the last chunk padded, so every chunk runs
  one compiled program). max_new_tokens None = the model's max_len. options:
  beam_size, length_penalty, sampling, seed (see `translate_ids`).
  """
  from research.data.parallel_text import Specials  # data imports stay out of models
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


def length_penalty_of(length, alpha: float):
  """GNMT's lp(n) = ((5 + n) / 6) ** alpha; 1 for alpha 0."""
  return ((5.0 + length) / 6.0) ** alpha


@functools.lru_cache(maxsize=32)
def _compiled_seq2seq(model_cfg: ModelConfig, sampling: Sampling, beam_size: int | None,
                      length_penalty: float, max_new_tokens: int) -> Callable:
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

    def choose(logits, t, done):  # -> token [B], its log-probability [B]
      token = sample(logits, jax.random.fold_in(key, t), sampling)
      token = jnp.where(done, pad_id, token)
      log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], 1)[:, 0]
      return token, jnp.where(done, 0.0, log_p)

    batch = source_ids.shape[0]
    token, score = choose(logits[:, 0], 0, jnp.zeros((batch,), jnp.bool_))
    out = jnp.full((batch, steps), pad_id, jnp.int32).at[:, 0].set(token)

    def unfinished(state):
      t, _, _, _, _, done = state
      return (t < steps) & ~jnp.all(done)

    def decode(state):
      t, token, cache, out, score, done = state
      logits, cache = step(params, token, cache)
      token, log_p = choose(logits[:, 0], t, done)
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
      log_p = jax.nn.log_softmax(s["logits"].astype(jnp.float32)).reshape(batch, k, vocab)
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
