"""Parallel text: file formats, refusals, the source-hash split, batch layout, the
synthetic translation task."""

import json

import numpy as np
import pytest

from fusedlm.research.data import synthetic_translation as st
from fusedlm.research.data.parallel_text import (
    Seq2SeqBatches,
    Specials,
    load_parallel_text,
    split_pairs,
)
from fusedlm.research.data.tokenizer import train_tokenizer

PAIRS = [("the cat sleeps", "el gato duerme"), ("a dog", "un perro"),
         ("I said \"no\".", "Dije \"no\"."), ("go", "ve")]


@pytest.fixture(scope="module")
def tokenizer():
  return train_tokenizer("byte", [])


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


@pytest.mark.parametrize("kind", ["tsv", "tsv_headerless", "csv", "jsonl", "aligned"])
def test_every_format_reads_the_same_pairs(tmp_path, kind):
  fields = {}
  if kind == "tsv":
    path = _write(tmp_path / "p.tsv", "en\tes\n" + "".join(f"{a}\t{b}\n" for a, b in PAIRS))
    fields = dict(source_field="en", target_field="es")
  elif kind == "tsv_headerless":  # Tatoeba's layout: a third attribution column
    path = _write(tmp_path / "p.tsv", "".join(f"{a}\t{b}\tCC-BY\n" for a, b in PAIRS))
    fields = dict(source_field="0", target_field="1", header=False)
  elif kind == "csv":
    path = tmp_path / "p.csv"
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(["source", "target"])
      writer.writerows(PAIRS)
  elif kind == "jsonl":
    path = _write(tmp_path / "p.jsonl", "".join(
        json.dumps({"source": a, "target": b}) + "\n" for a, b in PAIRS))
  else:
    path = _write(tmp_path / "p.en", "".join(a + "\n" for a, _ in PAIRS))
    fields = dict(target_path=_write(tmp_path / "p.es", "".join(b + "\n" for _, b in PAIRS)))
  pairs = load_parallel_text(path, **fields)
  assert list(zip(pairs.sources, pairs.targets)) == PAIRS
  assert pairs.origins[0].startswith(str(path))


def test_refusals_name_the_file_line_and_problem(tmp_path):
  path = _write(tmp_path / "p.jsonl", '{"source": "a", "target": "b"}\n{"source": "c"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:2: missing field 'target'; fields"
                     r" present: \['source'\]"):
    load_parallel_text(path)
  path = _write(tmp_path / "q.tsv", "source\ttarget\nhello\thola\n  \tnada\n")
  with pytest.raises(ValueError, match=r"q.tsv:3: the source side \(field 'source'\) is"
                     " empty"):
    load_parallel_text(path)
  path = _write(tmp_path / "r.tsv", "hello\t\tCC-BY\n")
  with pytest.raises(ValueError, match=r"r.tsv:1: the target side \(field '1'\)"):
    load_parallel_text(path, source_field="0", target_field="1", header=False)
  with pytest.raises(ValueError, match="has 2 lines but .* has 1"):
    load_parallel_text(_write(tmp_path / "s.en", "a\nb\n"),
                       target_path=_write(tmp_path / "s.es", "x\n"))
  with pytest.raises(FileNotFoundError, match="no parallel text file"):
    load_parallel_text(tmp_path / "missing.tsv")
  with pytest.raises(ValueError, match="expected .csv, .tsv"):
    load_parallel_text(_write(tmp_path / "t.txt", "a\n"))


def test_a_pair_longer_than_the_positions_is_refused_with_the_limit(tmp_path, tokenizer):
  path = _write(tmp_path / "p.tsv", "source\ttarget\nhi\thola\nhi there\tuna frase larga\n")
  pairs = load_parallel_text(path)
  with pytest.raises(ValueError, match=r"p.tsv:3: the target is 15 tokens \+ the end"
                     r" token = 16, longer than the 8 positions"):
    Seq2SeqBatches(pairs, tokenizer, seq_len=8, batch_size=1, seed=0)
  skipping = Seq2SeqBatches(pairs, tokenizer, seq_len=8, batch_size=1, seed=0,
                            too_long="skip")
  assert skipping.skipped == 1 and skipping.pairs.sources == ["hi"]


def test_split_by_source_hash_keeps_every_translation_of_a_source_together():
  sources = [f"sentence {i % 300}" for i in range(900)]  # each source thrice
  pairs = st.ParallelText(sources, [f"t{i}" for i in range(900)],
                          [f"x:{i}" for i in range(900)], "x")
  train, validation = split_pairs(pairs, 0.1)
  assert len(train) + len(validation) == 900
  assert not set(train.sources) & set(validation.sources)
  assert 0.05 < len(validation) / 900 < 0.15
  again, _ = split_pairs(pairs.subset(np.arange(900)[::-1]), 0.1)
  assert set(again.sources) == set(train.sources)  # order does not matter


def _pairs(n=12):
  rng = np.random.default_rng(0)
  words = ["ab", "cde", "f", "ghij", "kl"]
  sources = [" ".join(rng.choice(words, rng.integers(1, 4))) for _ in range(n)]
  targets = [" ".join(rng.choice(words, rng.integers(1, 5))) for _ in range(n)]
  return st.ParallelText(sources, targets, [f"x:{i}" for i in range(n)], "x")


def test_padded_rows_are_teacher_forced_pairs(tokenizer):
  pairs = _pairs()
  batches = Seq2SeqBatches(pairs, tokenizer, seq_len=24, batch_size=4, seed=0,
                           label_smoothing=0.1)
  sp = Specials.of(tokenizer)
  batch = next(batches.eval_batches())
  for row in range(4):
    source = tokenizer.encode(pairs.sources[row])
    target = tokenizer.encode(pairs.targets[row])
    n, m = len(source) + 1, len(target) + 1
    np.testing.assert_array_equal(batch["source_ids"][row, :n], np.append(source, sp.end))
    np.testing.assert_array_equal(batch["source_padding_mask"][row], np.arange(24) < n)
    np.testing.assert_array_equal(batch["target_inputs"][row, :m], np.append(sp.start, target))
    np.testing.assert_array_equal(batch["targets"][row, :m], np.append(target, sp.end))
    np.testing.assert_array_equal(batch["loss_mask"][row], np.arange(24) < m)
  np.testing.assert_array_equal(batch["label_smoothing"], 0.0)  # evaluation
  np.testing.assert_array_equal(batches.batch(0)["label_smoothing"], np.float32(0.1))
  assert "source_segment_ids" not in batch


def test_packed_rows_hold_the_same_pairs_with_segments(tokenizer):
  pairs = _pairs(40)
  packed = Seq2SeqBatches(pairs, tokenizer, seq_len=32, batch_size=2, seed=3, packing=True)
  seen, rows = [], 0
  for batch in packed.eval_batches():
    for row in range(2):
      if batch["weights"][row] == 0:
        continue
      rows += 1
      segments = batch["source_segment_ids"][row]
      for k in range(1, segments.max() + 1):
        src = batch["source_ids"][row][segments == k]
        tgt = batch["targets"][row][batch["target_segment_ids"][row] == k]
        np.testing.assert_array_equal(batch["source_positions"][row][segments == k],
                                      np.arange(len(src)))
        seen.append((tokenizer.decode(src[:-1]), tokenizer.decode(tgt[:-1])))
  assert sorted(seen) == sorted(zip(pairs.sources, pairs.targets))
  assert rows <= len(pairs) // 2  # rows do hold several pairs


def test_synthetic_task_rules_on_a_hand_built_sentence():
  lex = st.lexicon()
  nouns = list(lex.nouns)
  two_word = next(n for n in nouns if len(lex.nouns[n][0]) == 2)  # gender "a"
  one_word = next(n for n in nouns if len(lex.nouns[n][0]) == 1 and lex.nouns[n][1] == "o")
  adj1, adj2 = list(lex.adjectives)[:2]
  verb = next(v for v in lex.verbs if len(lex.verbs[v]) == 2)
  adverb = list(lex.adverbs)[0]
  source = f"mo {adj1} {adj2} {one_word} {verb} {two_word} {adverb}"
  first, second = lex.nouns[two_word][0]
  expected = [lex.adverbs[adverb],  # the adverb moves to the front
              lex.nouns[one_word][0][0] + "en",  # "mo" becomes a suffix
              lex.adjectives[adj2] + "oi", lex.adjectives[adj1] + "oi",  # mirrored, agree
              first, second, "ne",  # one word becomes two; the object's particle
              *lex.verbs[verb][:-1], lex.verbs[verb][-1] + "un"]  # verb last, agrees
  assert st.translate(source) == " ".join(expected)
  with pytest.raises(ValueError, match="one verb needed"):
    st.translate(f"{one_word} {two_word}")
  pairs = st.synthetic_pairs(500, seed=1)
  assert len(set(pairs.sources)) == 500
  assert pairs.sources == st.synthetic_pairs(500, seed=1).sources
