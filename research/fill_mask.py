"""Fill-mask: a masked-LM encoder's most likely tokens for each [MASK] in a text.

  python -m research.fill_mask --workdir /tmp/tiny_bert --text "The [MASK] sat on the mat."
  python -m research.fill_mask --workdir DIR --text "a [MASK] b" --text "[MASK] c" \\
      --top_k 10 --step 200 --output /tmp/fill.json

From Python:

  run = checkpoint.open_run("/tmp/tiny_bert")
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

from research import checkpoint, command_line, models
from research.models.config import ModelConfig

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


def fill_mask(run: checkpoint.SavedRun, params, texts: Sequence[str], top_k: int = 5,
              ) -> list[list[list[Prediction]]]:
  """The top_k predictions for every mask of every text.

  Args:
    run: a `research.checkpoint.SavedRun` of a masked-LM encoder.
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
    where = f"text {index + 1} ({_clip(text)})"
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


def _clip(text: str, width: int = 60) -> str:
  return repr(text if len(text) <= width else text[:width - 3] + "...")


def format_table(texts: Sequence[str], results: list[list[list[Prediction]]]) -> str:
  """A readable table per mask: rank, probability, id, token, filled text."""
  lines = []
  for text, per_mask in zip(texts, results):
    for index, predictions in enumerate(per_mask):
      lines.append(f"{_clip(text)}  mask {index + 1} of {len(per_mask)}")
      lines.append(f"  {'rank':>4}  {'prob':>7}  {'id':>6}  {'token':<12}  filled text")
      for rank, p in enumerate(predictions, 1):
        lines.append(f"  {rank:>4}  {p.probability:>7.2%}  {p.token_id:>6}"
                     f"  {p.token!r:<12}  {_clip(p.filled_text)}")
      lines.append("")
  return "\n".join(lines)


def to_json(workdir, step: int, top_k: int, texts: Sequence[str],
            results: list[list[list[Prediction]]]) -> dict:
  """The --output record: per text, per mask, the predictions as dicts."""
  return {
      "workdir": str(workdir), "step": step, "top_k": top_k,
      "results": [{"text": text,
                   "masks": [[p.to_dict() for p in predictions] for predictions in per_mask]}
                  for text, per_mask in zip(texts, results)],
  }


def _main():
  from absl import flags  # Parsed in __main__ only: importing stays flag-free.
  FLAGS = flags.FLAGS
  run = checkpoint.open_run(FLAGS.workdir)
  step, params = run.restore_params(FLAGS.step)
  results = fill_mask(run, params, FLAGS.text, FLAGS.top_k)
  print(f"{run.workdir} at step {step}\n")
  print(format_table(FLAGS.text, results))
  if FLAGS.output:
    record = to_json(run.workdir, step, FLAGS.top_k, FLAGS.text, results)
    print(f"wrote {command_line.write_json(record, FLAGS.output)}")


if __name__ == "__main__":
  from absl import flags
  flags.DEFINE_string("workdir", None, "run folder written by research.train")
  flags.DEFINE_multi_string("text", None, "text with one or more [MASK] (repeatable)")
  flags.DEFINE_integer("top_k", 5, "predictions per mask")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
  flags.DEFINE_string("output", None, "also write the predictions to this JSON file")
  flags.mark_flags_as_required(["workdir", "text"])
  command_line.run(_main, "research.fill_mask")
