"""Training, saving and loading tokenizers, their special ids, and bad requests."""

import json

import numpy as np
import pytest

from fusedlm.research.data import tokenizer as tokenizer_module
from fusedlm.research.data.corpus import Corpus
from fusedlm.research.data.tokenizer import get_or_train_tokenizer, load_tokenizer, train_tokenizer

TEXT = "Hello, wordsmiths! Tokenizers split text into pieces: 42 café"


def test_wordpiece_has_bert_specials_first(wordpiece):
  assert [wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id,
          wordpiece.mask_id, wordpiece.eos_id] == [0, 1, 2, 3, 4, None]
  assert wordpiece.special_ids == {0, 1, 2, 3, 4}
  assert wordpiece.vocab_size <= 800
  tokens = [wordpiece.id_to_token(i) for i in wordpiece.encode("wordsmiths")]
  assert tokens[0] != "[UNK]" and all(t.startswith("##") for t in tokens[1:])
  assert wordpiece.decode(wordpiece.encode(TEXT)) == "hello, wordsmiths! tokenizers split " \
      "text into pieces : 42 cafe"


def test_bpe_is_byte_level_with_end_of_text(bpe):
  assert bpe.eos_id == 0 and bpe.special_ids == {0}
  assert (bpe.pad_id, bpe.cls_id, bpe.sep_id, bpe.mask_id, bpe.unk_id) == (None,) * 5
  unicode = "naïve 日本語 ✓\n\ttabs"
  assert bpe.decode(bpe.encode(TEXT + unicode)) == TEXT + unicode


def test_byte_ids_are_bytes_shifted_past_the_specials(byte_level):
  text = "héllo\n✓"
  np.testing.assert_array_equal(byte_level.encode(text),
                                np.frombuffer(text.encode(), dtype=np.uint8) + 5)
  assert byte_level.vocab_size == 261 and byte_level.special_ids == set(range(5))
  assert (byte_level.pad_id, byte_level.eos_id, byte_level.unk_id) == (0, 4, None)
  assert byte_level.decode(byte_level.encode(text)) == text


def test_encode_batch_matches_single_encodes(wordpiece):
  texts = [TEXT, "", "second text"]
  batch = wordpiece.encode_batch(texts)
  assert all(ids.dtype == np.int32 for ids in batch)
  for ids, text in zip(batch, texts):
    np.testing.assert_array_equal(ids, wordpiece.encode(text))
  assert len(batch[1]) == 0


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_training_is_deterministic(kind, english_docs):
  # HF's WordPiece trainer alone gives a different vocabulary on most runs.
  fingerprints = {train_tokenizer(kind, english_docs[:15], 400).fingerprint for _ in range(3)}
  assert len(fingerprints) == 1


@pytest.mark.parametrize("name", ["wordpiece", "bpe", "byte_level"])
def test_save_and_load_round_trip(name, request, tmp_path):
  tokenizer = request.getfixturevalue(name)
  loaded = load_tokenizer(tokenizer.save(tmp_path / "tok"))
  assert loaded.fingerprint == tokenizer.fingerprint
  assert (loaded.kind, loaded.roles, loaded.special_ids) == (tokenizer.kind, tokenizer.roles,
                                                            tokenizer.special_ids)
  np.testing.assert_array_equal(loaded.encode(TEXT), tokenizer.encode(TEXT))
  np.testing.assert_array_equal(loaded.word_start_table, tokenizer.word_start_table)


def test_bare_vocab_txt_loads_as_the_same_wordpiece(wordpiece, tmp_path):
  wordpiece.save(tmp_path)
  loaded = load_tokenizer(tmp_path / "vocab.txt")
  assert loaded.kind == "wordpiece" and loaded.special_ids == wordpiece.special_ids
  np.testing.assert_array_equal(loaded.encode(TEXT), wordpiece.encode(TEXT))


def test_hugging_face_folder_roles_come_from_its_config(bpe, tmp_path):
  bpe.hf.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps(
      {"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>"}))
  loaded = load_tokenizer(tmp_path)
  assert loaded.kind == "bpe"
  assert (loaded.eos_id, loaded.pad_id) == (0, 0)


def test_word_starts_follow_each_kind(wordpiece, bpe, byte_level):
  def starts(tok, text):
    return tok.word_start_table[tok.encode(text)].tolist()

  assert starts(wordpiece, "wordsmiths") == [True] + [False] * (len(wordpiece.encode(
      "wordsmiths")) - 1)
  assert starts(byte_level, "ab cd") == [False, False, True, False, False]
  ids = bpe.encode("the wordsmiths")
  assert bpe.word_start_table[ids].sum() == 1  # Only "Ġword..." starts a word.
  assert all(tok.word_start_table[list(tok.special_ids)].all()
             for tok in (wordpiece, bpe, byte_level))


def test_trained_tokenizer_is_cached_per_corpus(english_docs, tmp_path, monkeypatch):
  corpus = Corpus("c", english_docs[:10], english_docs[10:12])
  first = get_or_train_tokenizer("bpe", corpus, 300, tmp_path)
  monkeypatch.setattr(tokenizer_module, "train_tokenizer",
                      lambda *a, **k: pytest.fail("trained again"))
  again = get_or_train_tokenizer("bpe", corpus, 300, tmp_path)
  assert again.fingerprint == first.fingerprint


def test_unknown_kind_is_rejected():
  with pytest.raises(ValueError, match=r"unknown tokenizer kind 'sentencepiece'.*wordpiece"):
    train_tokenizer("sentencepiece", ["text"], 100)


@pytest.mark.parametrize("kind, vocab_size, message", [
    ("wordpiece", 5, "vocab_size=5 is too small for a wordpiece"),
    ("wordpiece", 30, "vocab_size=30 is too small for this corpus"),
    ("bpe", 200, "vocab_size=200 is too small for a bpe tokenizer.*257"),
    ("byte", 100, "vocab_size=100 is too small: the byte tokenizer has 261"),
    ("bpe", None, "vocab_size is required"),
])
def test_too_small_vocabulary_is_rejected(kind, vocab_size, message, english_docs):
  with pytest.raises(ValueError, match=message):
    train_tokenizer(kind, english_docs[:5], vocab_size)


def test_empty_training_text_is_rejected():
  with pytest.raises(ValueError, match="empty corpus"):
    train_tokenizer("wordpiece", ["", ""], 100)


def test_loading_nothing_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
    load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="missing.json"):
    load_tokenizer(tmp_path / "missing.json")
  (tmp_path / "vocab.bin").write_text("x")
  with pytest.raises(ValueError, match="vocab.bin"):
    load_tokenizer(tmp_path / "vocab.bin")
