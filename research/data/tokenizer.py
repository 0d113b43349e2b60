"""A small wrapper around Hugging Face `tokenizers`: train, save, load, encode.

`Tokenizer` adds to the HF object what the batch makers need: the ids of the
special-token roles (pad, unk, cls, sep, mask, eos; None where a tokenizer has no
such token), the set of special ids, which tokens start a word (for whole-word
masking), and a content fingerprint for cache keys.

A run saves its tokenizer (`Tokenizer.save`) next to its checkpoints; evaluation
reloads that very file with `load_tokenizer`. The folder layout is the one Hugging
Face model folders use: tokenizer.json, tokenizer_config.json (role tokens and
our "fusedlm_kind"), and vocab.txt for WordPiece.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers

from fusedlm.research.data import partials, tokenizer_training
from fusedlm.research.data.corpus import Corpus

KINDS = ("wordpiece", "bpe", "byte")
ROLES = ("pad", "unk", "cls", "sep", "mask", "eos")

# Token strings that fill a role when a loaded tokenizer's config does not say.
_ROLE_CANDIDATES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
    "eos": ("<|endoftext|>", "</s>", "[EOS]", "<eos>"),
}
_ROLES_BY_KIND = {
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]",
                  "mask": "[MASK]"},
    "bpe": {"eos": "<|endoftext|>"},
    "byte": {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]",
             "eos": "<|endoftext|>"},
}
# Byte-level tokens that begin with one of these (space, tab, newlines) start a word.
_WHITESPACE_BYTE_CHARS = frozenset(
    tokenizer_training.byte_to_printable()[b] for b in b" \t\n\r\x0b\x0c")
_METASPACE = "\u2581"
CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
  """A Hugging Face tokenizer plus special-token roles.

  Attributes:
    kind: "wordpiece", "bpe" or "byte" for the kinds trained here; for loaded
      tokenizers the saved kind or one inferred from the model type.
    hf: the underlying `tokenizers.Tokenizer` (padding and truncation disabled).
    roles: role -> token string, for the roles this tokenizer has.
  """

  def __init__(self, hf: tokenizers.Tokenizer, kind: str, roles: dict[str, str]):
    hf.no_padding()
    hf.no_truncation()
    self.hf = hf
    self.kind = kind
    self.roles = {role: token for role, token in roles.items()
                  if hf.token_to_id(token) is not None}
    ids = {role: hf.token_to_id(token) for role, token in self.roles.items()}
    self.pad_id: int | None = ids.get("pad")
    self.unk_id: int | None = ids.get("unk")
    self.cls_id: int | None = ids.get("cls")
    self.sep_id: int | None = ids.get("sep")
    self.mask_id: int | None = ids.get("mask")
    self.eos_id: int | None = ids.get("eos")
    added = {i for i, token in hf.get_added_tokens_decoder().items() if token.special}
    self.special_ids: frozenset[int] = frozenset(added | set(ids.values()))
    self._vocab = hf.get_vocab(with_added_tokens=True)
    # The embedding table must cover the largest id, even if ids have gaps.
    self.vocab_size: int = max(self._vocab.values()) + 1

  def __repr__(self) -> str:
    return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, roles={self.roles})"

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 of the serialized pipeline: equal fingerprints tokenize alike."""
    return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text, int32 [len_i], without added [CLS]/[SEP] framing.

    Runs in parallel over texts on the HF tokenizer's Rayon thread pool.
    """
    encodings = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

  def encode(self, text: str) -> np.ndarray:
    return self.encode_batch([text])[0]

  def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int32 [n], offsets int64 [n, 2]) of each text, without framing.

    offsets[i] = (start, end) characters of `text` that token i came from, as
    Hugging Face `tokenizers` tracks them through normalisation (lower-casing,
    accent stripping): text[start:end] is the token's original spelling. A
    byte-level token may include the space before a word, and the bytes of one
    character share its offsets. Slower than encode_batch, which skips them.
    """
    encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
    return [(np.asarray(e.ids, dtype=np.int32),
             np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)) for e in encodings]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; special tokens are kept by default so nothing is hidden."""
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, token_id: int) -> str | None:
    return self.hf.id_to_token(int(token_id))

  @functools.cached_property
  def regular_ids(self) -> np.ndarray:
    """Sorted ids of all non-special tokens, int32; MLM draws random tokens from these."""
    return np.array(sorted(set(self._vocab.values()) - self.special_ids), dtype=np.int32)

  @functools.cached_property
  def word_start_table(self) -> np.ndarray:
    """bool [vocab_size]: True where a token begins a new word.

    WordPiece: tokens without the "##" prefix. Byte-level BPE and "byte": tokens
    that begin with a whitespace byte (GPT-2 glues the space to the next word).
    SentencePiece-style vocabularies: tokens that begin with U+2581. Special tokens
    always start a word. Other models: every token is its own word.
    """
    starts = _word_start_rule(self.hf, self._vocab)
    table = np.ones(self.vocab_size, dtype=bool)
    for token, token_id in self._vocab.items():
      table[token_id] = token_id in self.special_ids or starts(token)
    return table

  def save(self, directory: str | os.PathLike) -> Path:
    """Writes tokenizer.json, tokenizer_config.json (and vocab.txt for WordPiece).

    Each file is published atomically and only if its content changed
    (`partials.publish`): a kill mid-save leaves every file whole, and saving
    the same tokenizer again writes nothing.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    partials.publish(directory / "tokenizer.json", self.hf.to_str(pretty=True))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "fusedlm_kind": self.kind}
    config.update({f"{role}_token": token for role, token in self.roles.items()})
    normalizer = json.loads(self.hf.to_str()).get("normalizer") or {}
    if "lowercase" in normalizer:
      config["do_lower_case"] = normalizer["lowercase"]
    partials.publish(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    ids = sorted(self._vocab.values())
    if self.kind == "wordpiece" and ids == list(range(len(ids))):
      by_id = sorted(self._vocab, key=self._vocab.__getitem__)
      partials.publish(directory / "vocab.txt", "".join(token + "\n" for token in by_id))
    return directory


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None, *,
                    lowercase: bool = True, min_frequency: int = 2) -> Tokenizer:
  """Trains a tokenizer of `kind` on `texts` (deterministic).

  Args:
    kind: "wordpiece" (BERT-style), "bpe" (GPT-2-style byte-level) or "byte".
    texts: training documents.
    vocab_size: size of the vocabulary including specials. Required for
      "wordpiece" and "bpe" (the result can be smaller on a small corpus). "byte"
      always has 261 ids; a given vocab_size must be at least that.
    lowercase: WordPiece only: lower-case (and strip accents) as BERT-uncased.
    min_frequency: fewest occurrences of a pair for it to be merged.

  Raises:
    ValueError: unknown kind, no text, or a vocabulary too small for the specials
      plus the corpus's alphabet.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
  if kind == "byte":
    hf = tokenizer_training.byte_tokenizer()
    if vocab_size is not None and vocab_size < hf.get_vocab_size():
      raise ValueError(f"vocab_size={vocab_size} is too small: the byte tokenizer has "
                       f"{hf.get_vocab_size()} tokens (256 bytes + specials)")
    return Tokenizer(hf, kind, _ROLES_BY_KIND[kind])
  texts = [text for text in texts if text]
  if not texts:
    raise ValueError(f"cannot train a {kind} tokenizer on an empty corpus")
  if vocab_size is None:
    raise ValueError(f"vocab_size is required for a {kind} tokenizer")
  minimum = len(tokenizer_training.SPECIALS_BY_KIND[kind]) + (256 if kind == "bpe" else 1)
  if vocab_size < minimum:
    raise ValueError(f"vocab_size={vocab_size} is too small for a {kind} tokenizer: "
                     f"its special tokens and base alphabet need at least {minimum}")
  if kind == "wordpiece":
    hf = tokenizer_training.train_wordpiece(texts, vocab_size, lowercase=lowercase,
                                            min_frequency=min_frequency)
  else:
    hf = tokenizer_training.train_bpe(texts, vocab_size, min_frequency=min_frequency)
  if hf.get_vocab_size() > vocab_size:
    raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: the special "
                     f"tokens and the corpus's characters alone need {hf.get_vocab_size()}")
  return Tokenizer(hf, kind, _ROLES_BY_KIND[kind])


def get_or_train_tokenizer(kind: str, corpus: Corpus, vocab_size: int | None,
                           cache_dir: str | os.PathLike, **options) -> Tokenizer:
  """Loads the tokenizer trained on `corpus.train` from `cache_dir`, training it once.

  Keyed by kind, vocab_size, options, the corpus fingerprint and the `tokenizers`
  version, so a second run gets the identical tokenizer (and its cached data).
  """
  key_text = json.dumps([kind, vocab_size, sorted(options.items()), corpus.fingerprint,
                         tokenizers.__version__])
  key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
  directory = Path(cache_dir) / "tokenizers" / f"{kind}-{vocab_size}-{key}"
  if (directory / "tokenizer.json").exists():
    return load_tokenizer(directory)
  partials.remove_stale(directory.parent)
  tokenizer = train_tokenizer(kind, corpus.train, vocab_size, **options)
  partial = partials.partial_path(directory)
  tokenizer.save(partial)
  try:
    os.replace(partial, directory)  # Atomic; a concurrent run may have won the race.
  except OSError:
    if not (directory / "tokenizer.json").exists():
      raise
  return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads a tokenizer from a folder (tokenizer.json, else vocab.txt) or a file.

  Role tokens come from tokenizer_config.json / special_tokens_map.json next to the
  file when present (as in Hugging Face model folders), else from the usual names
  ([PAD], <pad>, [CLS], <s>, <|endoftext|>, ...). A bare vocab.txt becomes a
  BERT-style WordPiece tokenizer, lower-casing when the config says
  do_lower_case or, without a config, when the vocabulary has no capital letter.

  Raises:
    FileNotFoundError: nothing to load at `path`.
    ValueError: a file that is neither .json nor .txt.
  """
  path = Path(path)
  if path.is_dir():
    candidates = [path / "tokenizer.json", path / "vocab.txt"]
    found = [candidate for candidate in candidates if candidate.is_file()]
    if not found:
      raise FileNotFoundError(f"{path} holds neither tokenizer.json nor vocab.txt")
    path = found[0]
  elif not path.is_file():
    raise FileNotFoundError(f"no tokenizer at {path}")
  config = _read_folder_config(path.parent)
  if path.suffix == ".json":
    try:
      hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
      raise ValueError(f"cannot read the tokenizer {path} (truncated, or not a Hugging"
                       f" Face tokenizers file?): {e}") from e
  elif path.suffix == ".txt":
    hf = _wordpiece_from_vocab(path, config)
  else:
    raise ValueError(f"cannot load a tokenizer from {path}: expected tokenizer.json or "
                     "vocab.txt")
  kind = config.get("fusedlm_kind") or _infer_kind(hf)
  return Tokenizer(hf, kind, _resolve_roles(hf, config))


def _read_folder_config(folder: Path) -> dict:
  config: dict = {}
  for name in ("special_tokens_map.json", CONFIG_FILE):
    if (folder / name).is_file():
      try:
        config.update(json.loads((folder / name).read_text(encoding="utf-8")))
      except json.JSONDecodeError as e:
        raise ValueError(f"{folder / name} is not valid JSON (truncated?): {e}") from e
  return config


def _resolve_roles(hf: tokenizers.Tokenizer, config: dict) -> dict[str, str]:
  roles = {}
  for role in ROLES:
    value = config.get(f"{role}_token")
    if isinstance(value, dict):  # HF writes AddedToken objects as {"content": ...}.
      value = value.get("content")
    candidates = ([value] if isinstance(value, str) else []) + list(_ROLE_CANDIDATES[role])
    for token in candidates:
      if hf.token_to_id(token) is not None:
        roles[role] = token
        break
  return roles


def _wordpiece_from_vocab(path: Path, config: dict) -> tokenizers.Tokenizer:
  vocab = path.read_text(encoding="utf-8").splitlines()
  lowercase = config.get("do_lower_case")
  if lowercase is None:
    lowercase = not any(char.isupper() for token in vocab for char in token
                        if not (token.startswith("[") and token.endswith("]")))
  hf = tokenizer_training.wordpiece_pipeline(lowercase=bool(lowercase))
  unk = "[UNK]" if "[UNK]" in vocab else config.get("unk_token", "[UNK]")
  hf.model = tokenizers.models.WordPiece.from_file(str(path), unk_token=unk)
  specials = [token for role in ROLES for token in _ROLE_CANDIDATES[role] if token in vocab]
  hf.add_special_tokens(sorted(set(specials), key=vocab.index))
  return hf


def _word_start_rule(hf: tokenizers.Tokenizer, vocab: dict[str, int]) -> Callable[[str], bool]:
  """A predicate telling whether a token string begins a word, for hf's model."""
  model = json.loads(hf.to_str())["model"]
  if model["type"] == "WordPiece":
    prefix = model.get("continuing_subword_prefix") or tokenizer_training.CONTINUATION_PREFIX
    return lambda token: not token.startswith(prefix)
  if _is_byte_level(hf):
    return lambda token: token[0] in _WHITESPACE_BYTE_CHARS
  if any(token.startswith(_METASPACE) for token in vocab):
    return lambda token: token.startswith(_METASPACE)
  return lambda token: True


def _is_byte_level(hf: tokenizers.Tokenizer) -> bool:
  return "ByteLevel" in json.dumps(json.loads(hf.to_str()).get("pre_tokenizer"))


def _infer_kind(hf: tokenizers.Tokenizer) -> str:
  config = json.loads(hf.to_str())
  model_type = config["model"]["type"]
  if model_type == "WordPiece":
    return "wordpiece"
  if model_type == "BPE" and _is_byte_level(hf):
    return "byte" if not config["model"].get("merges") else "bpe"
  return model_type.lower()
