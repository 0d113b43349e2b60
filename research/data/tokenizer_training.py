"""Hugging Face `tokenizers` pipelines for the three trainable kinds.

Each function returns a plain `tokenizers.Tokenizer`; `research.data.tokenizer`
wraps it with the special-token roles the batch makers need.

* "wordpiece": BERT-style. BERT normalizer (lower-casing by default, accents
  stripped when lower-casing), BERT pre-tokenizer (whitespace and punctuation),
  WordPiece with "##" continuation prefix; specials [PAD] [UNK] [CLS] [SEP] [MASK]
  with ids 0-4.
* "bpe": GPT-2-style byte-level BPE: the GPT-2 split regex, every byte mapped to a
  printable character, no unknown tokens; special <|endoftext|> with id 0.
* "byte": one token per UTF-8 byte, token id = SPECIALS_BY_KIND["byte"] count +
  byte value; not trained, the vocabulary is always 256 bytes plus 5 specials.

Training is deterministic: same texts and settings give the same tokenizer.json.
WordPiece needed a workaround for that (see `train_wordpiece`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS_BY_KIND = {
    "wordpiece": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "bpe": ("<|endoftext|>",),
    "byte": ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"),
}
CONTINUATION_PREFIX = "##"


def wordpiece_pipeline(lowercase: bool = True) -> Tokenizer:
  """An untrained BERT-style WordPiece tokenizer."""
  tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]",
                                         continuing_subword_prefix=CONTINUATION_PREFIX))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
  return tokenizer


def train_wordpiece(texts: Sequence[str], vocab_size: int, *, lowercase: bool = True,
                    min_frequency: int = 2) -> Tokenizer:
  """A BERT-style WordPiece tokenizer trained on `texts`.

  The HF trainer creates its "##c" continuation tokens while iterating a hash map,
  so their ids, and through tie-breaking on ids even the learned merges, change
  from run to run (huggingface/tokenizers#1794). Registering every "##c" the
  corpus needs as a special token up front fixes their ids in sorted order; they
  are turned back into ordinary vocabulary entries afterwards.
  """
  tokenizer = wordpiece_pipeline(lowercase)
  specials = list(SPECIALS_BY_KIND["wordpiece"])
  continuations = [CONTINUATION_PREFIX + char
                   for char in sorted(_continuation_characters(tokenizer, texts))]
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
      special_tokens=specials + continuations,
      continuing_subword_prefix=CONTINUATION_PREFIX)
  tokenizer.train_from_iterator(texts, trainer, length=len(texts))
  return _keep_only_added_tokens(tokenizer, set(specials))


def _continuation_characters(tokenizer: Tokenizer, texts: Sequence[str]) -> set[str]:
  """Characters that occur after the first character of a pre-tokenized word."""
  found: set[str] = set()
  for text in texts:
    words = tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text))
    found.update("".join(word[1:] for word, _ in words))
  return found


def _keep_only_added_tokens(tokenizer: Tokenizer, keep: set[str]) -> Tokenizer:
  """Demotes added tokens not in `keep` to plain vocabulary entries (ids unchanged)."""
  config = json.loads(tokenizer.to_str())
  config["added_tokens"] = [t for t in config["added_tokens"] if t["content"] in keep]
  return Tokenizer.from_str(json.dumps(config))


def train_bpe(texts: Sequence[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
  """A GPT-2-style byte-level BPE tokenizer trained on `texts`."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
      special_tokens=list(SPECIALS_BY_KIND["bpe"]),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer, length=len(texts))
  return tokenizer


def byte_tokenizer() -> Tokenizer:
  """One token per UTF-8 byte: id = number of specials + byte value."""
  specials = SPECIALS_BY_KIND["byte"]
  vocab = {token: index for index, token in enumerate(specials)}
  for byte, char in enumerate(byte_to_printable()):
    vocab[char] = len(specials) + byte
  # A BPE model with no merges maps each byte's printable character to its id.
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(list(specials))
  return tokenizer


def byte_to_printable() -> list[str]:
  """GPT-2's byte-to-character table: entry b is the character standing for byte b.

  Printable Latin-1 bytes stand for themselves; the others are shifted to
  code points from 256 on, so that no byte maps to whitespace or a control code.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table = {}
  shifted = 0
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + shifted)
      shifted += 1
  return [table[byte] for byte in range(256)]
