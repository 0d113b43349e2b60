"""Text generation from a decoder: batched, jitted, with the model's KV cache.

  run = saved_run.open_run("runs/tiny_gpt")
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

Encoder-decoder decoding (translation, summarization) is
`research.inference.seq2seq_decoding`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusedlm.research import models
from fusedlm.research.data import Tokenizer
from fusedlm.research.inference.sampling import Sampling, sample
from fusedlm.research.models.config import ModelConfig

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
  return [until_eos(row, eos_id) for row in out]


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
        " translates a source; use fusedlm translate (seq2seq_decoding.translate_texts).")
  if model_cfg.kind != "decoder":
    raise ValueError(
        "generation needs a decoder (causal LM) checkpoint; this one is an"
        f" {model_cfg.kind} (kind={model_cfg.kind!r}), which predicts masked"
        " tokens, not the next one.")
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling must be a research.inference.sampling.Sampling, got {sampling!r}.")
  if not is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
  if not is_int(seed):
    raise ValueError(f"seed must be an int, got {seed!r}.")
  vocab = model_cfg.vocab_size
  for name, token in (("eos_id", eos_id), ("pad_id", pad_id)):
    if token is None and name == "eos_id":
      continue
    if not is_int(token) or not 0 <= token < vocab:
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
    run,  # a runs.saved_run.SavedRun: its model_cfg and tokenizer
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


def is_int(x) -> bool:
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


def until_eos(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
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
