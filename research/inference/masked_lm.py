"""Fill-mask: a masked-LM encoder's most likely tokens for each [MASK] in a text
(the library of `fusedlm fill-mask`).

  run = saved_run.open_run("/tmp/tiny_bert")   # research.runs.checkpoint
  _, params = run.restore_params()
  for per_mask in fill_mask(run, params, ["The [MASK] sat."])[0]:
    print([(p.token, round(p.probability, 3)) for p in per_mask])

Each text is framed as the MLM batches frame a one-segment example,
[CLS] text [SEP] with token types 0, and written with the tokenizer's own mask
token string (`run.tokenizer.roles["mask"]`, "[MASK]" for the tokenizers trained
here); that string is a special token, so it stays one id even under a
lower-casing WordPiece normalizer. The probabilities are the softmax over the
whole vocabulary at the mask's position, special tokens included, as the model
was trained to predict; several masks in one text are predicted jointly in one
pass, each marginally (not a beam over their combinations).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusedlm.research import models
from fusedlm.research.models.config import ModelConfig

# Padded lengths are rounded up to a power of two (capped at max_len), and the
# batch to one too, so a session of differently sized calls compiles a handful
# of shapes instead of one per call.
_MIN_PADDED_LEN = 8


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One candidate for one mask.

  Attributes:
    token: the vocabulary entry (tokenizer.id_to_token(token_id)).
    token_id: its id.
    probability: the model's probability of it at the mask's position.
    filled_text: the text decoded with this mask replaced by the token (the
      other masks left in place); the tokenizer's normalization shows, e.g.
      lower case under an uncased WordPiece.
  """

  token: str
  token_id: int
  probability: float
  filled_text: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def fill_mask(run, params, texts: Sequence[str], top_k: int = 5,
              ) -> list[list[list[Prediction]]]:
  """The top_k predictions for every mask of every text.

  Args:
    run: a `research.runs.saved_run.SavedRun` of a masked-LM encoder.
    params: its parameter tree (`run.restore_params(step)[1]`).
    texts: texts holding the tokenizer's mask token at least once each.
    top_k: candidates per mask, 1 to the vocabulary size.

  Returns:
    result[i][j]: the top_k predictions for the j-th mask (left to right) of
    texts[i], most probable first.

  Raises:
    ValueError: a run that is not a masked-LM encoder, a tokenizer without
      [CLS] / [SEP] / mask tokens, no texts, a text without a mask or too long
      for the model, or top_k out of range; the message names the problem.
  """
  cfg, tokenizer = run.model_cfg, run.tokenizer
  _check_model(run, cfg)
  missing = [role for role in ("cls", "sep", "mask")
             if getattr(tokenizer, f"{role}_id") is None]
  if missing:
    raise ValueError(
        f"the run's {tokenizer.kind} tokenizer has no {', '.join(missing)} token;"
        f" fill-mask frames each text as [CLS] text [SEP] and needs a mask token"
        f" (the tokenizer's roles: {tokenizer.roles}).")
  if isinstance(texts, str):
    raise TypeError("texts must be a sequence of strings; wrap a single text in a list.")
  texts = list(texts)
  if not texts:
    raise ValueError("no texts given: fill-mask needs at least one text with a"
                     f" {tokenizer.roles['mask']} token in it.")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) \
      or not 1 <= top_k <= cfg.vocab_size:
    raise ValueError(f"top_k must be an integer from 1 to the vocabulary size"
                     f" {cfg.vocab_size}, got {top_k!r}.")
  top_k = int(top_k)

  framed = frame_texts(tokenizer, texts, cfg.max_len)
  input_ids, padding_mask = _pad(framed, cfg.max_len, tokenizer.pad_id or 0)
  probs, ids = _predict_fn(cfg, top_k)(
      params, input_ids, np.zeros_like(input_ids), padding_mask)
  probs, ids = np.asarray(probs), np.asarray(ids)  # [rows, seq, top_k]

  results = []
  for row, sequence in enumerate(framed):
    per_mask = []
    for position in np.flatnonzero(sequence == tokenizer.mask_id):
      per_mask.append([
          _prediction(tokenizer, sequence, position, int(token_id), float(prob))
          for token_id, prob in zip(ids[row, position], probs[row, position])])
    results.append(per_mask)
  return results


def _check_model(run, cfg: ModelConfig) -> None:
  if cfg.kind != "encoder":
    raise ValueError(
        f"fill-mask needs a masked-LM encoder checkpoint; {run.workdir} holds a"
        f" {cfg.kind} (objective {run.config.get('objective')!r}), which predicts"
        " the next token instead: train one with objective='mlm'"
        " (e.g. experiments/tiny_bert.py).")
  if not cfg.mlm:
    raise ValueError(
        f"fill-mask needs a masked-LM encoder checkpoint; the encoder in"
        f" {run.workdir} was built without its MLM head (model.mlm=False), so it"
        " has no token predictions to read.")


def frame_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[np.ndarray]:
  """[CLS] ids [SEP] of each text, int32 [len_i], its masks as tokenizer.mask_id.

  Raises:
    ValueError: a text without a mask token, one whose mask string the
      tokenizer does not encode as the mask id, or one longer than max_len
      once framed.
  """
  mask_token = tokenizer.roles["mask"]
  framed = []
  for index, (text, ids) in enumerate(zip(texts, tokenizer.encode_batch(texts))):
    where = f"text {index + 1} ({clip(text)})"
    masks = int(np.sum(ids == tokenizer.mask_id))
    written = text.count(mask_token)
    if masks == 0:
      hint = (f"; mask tokens are case-sensitive, and {text.count(mask_token.lower())}"
              f" lower-case {mask_token.lower()!r} were found"
              if mask_token.lower() in text and mask_token.lower() != mask_token else "")
      raise ValueError(f"{where} has no mask token: write {mask_token} where a token"
                       f" should be predicted{hint}.")
    if masks != written:
      # Each mask must come from a written token so the user's masks are the
      # ones predicted; a tokenizer that splits the string would lose some.
      raise ValueError(f"{where} has {written} {mask_token} but the tokenizer encodes"
                       f" {masks} mask token(s); write {mask_token} exactly, each"
                       " once per masked token.")
    sequence = np.concatenate(
        [[tokenizer.cls_id], ids, [tokenizer.sep_id]]).astype(np.int32)
    if len(sequence) > max_len:
      raise ValueError(f"{where} is {len(sequence)} tokens with [CLS] and [SEP]"
                       f" ({len(ids)} + 2), more than the model's max_len {max_len};"
                       f" shorten it to at most {max_len - 2} tokens.")
    framed.append(sequence)
  return framed


def _pad(framed: list[np.ndarray], max_len: int, pad_id: int,
         ) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded ids [rows, seq] int32 and padding mask [rows, seq] bool.

  Extra rows (to a power of two) are all padding but for one token, so that
  every row attends to something.
  """
  longest = max(len(sequence) for sequence in framed)
  seq = min(max(_MIN_PADDED_LEN, _next_power_of_two(longest)), max_len)
  rows = _next_power_of_two(len(framed))
  input_ids = np.full((rows, seq), pad_id, dtype=np.int32)
  padding_mask = np.zeros((rows, seq), dtype=bool)
  padding_mask[len(framed):, 0] = True
  for row, sequence in enumerate(framed):
    input_ids[row, :len(sequence)] = sequence
    padding_mask[row, :len(sequence)] = True
  return input_ids, padding_mask


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=16)
def _predict_fn(cfg: ModelConfig, top_k: int):
  """Jitted (params, ids, types, mask) -> top_k (probs, ids), each [rows, seq, top_k]."""
  model = models.build_model(cfg)

  @jax.jit
  def predict(params, input_ids, token_type_ids, padding_mask):
    logits = model.apply({"params": params}, input_ids, token_type_ids,
                         padding_mask)["mlm_logits"]  # [rows, seq, vocab] f32
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, top_k)

  return predict


def _prediction(tokenizer, sequence: np.ndarray, position: int, token_id: int,
                probability: float) -> Prediction:
  filled = sequence.copy()
  filled[position] = token_id
  token = tokenizer.id_to_token(token_id)
  return Prediction(
      # Ids past the tokenizer's vocabulary exist in models with a padded
      # embedding table (imported checkpoints); name them rather than fail.
      token=token if token is not None else f"<id {token_id}>",
      token_id=token_id,
      probability=probability,
      filled_text=tokenizer.decode(filled[1:-1]))  # without [CLS] and [SEP]


def clip(text: str, width: int = 60) -> str:
  """repr of text, cut to `width` characters with "..." (errors and tables quote texts so)."""
  return repr(text if len(text) <= width else text[:width - 3] + "...")
