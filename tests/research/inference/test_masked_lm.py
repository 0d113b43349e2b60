"""Fill-mask on the trained tiny BERT: well-formed top-k, probabilities equal to
an independent softmax, batching invariance, every bad input's message, the CLI."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from fusedlm.research import models
from fusedlm.research.data import train_tokenizer
from fusedlm.research.inference.masked_lm import Prediction, fill_mask, frame_texts
from fusedlm.research.runs import saved_run
from tests.commands import fusedlm

ROOT = Path(__file__).resolve().parents[2]
# Text as the synthetic corpus writes it (its letters, no spaces).
TEXT = "bigbbbcknckffmfg[MASK]fcohmljahfmigbhpkalgpheocflppjl"


@pytest.fixture(scope="module")
def bert(trained_bert):
  run = saved_run.open_run(trained_bert)
  _, params = run.restore_params()
  return run, params


def test_top_k_is_well_formed(bert):
  run, params = bert
  [[predictions]] = fill_mask(run, params, [TEXT], top_k=7)
  assert len(predictions) == 7
  assert all(isinstance(p, Prediction) for p in predictions)
  probs = [p.probability for p in predictions]
  assert probs == sorted(probs, reverse=True)
  assert all(0.0 < p <= 1.0 for p in probs)
  assert sum(probs) <= 1.0 + 1e-5
  assert len({p.token_id for p in predictions}) == 7
  for p in predictions:
    assert 0 <= p.token_id < run.model_cfg.vocab_size
    assert p.token == run.tokenizer.id_to_token(p.token_id)
    # The byte tokenizer round-trips, so the filled text is the text with the
    # mask replaced by that one byte.
    assert p.filled_text == TEXT.replace("[MASK]", run.tokenizer.decode([p.token_id]))


def test_two_masks_give_two_lists(bert):
  run, params = bert
  [per_mask] = fill_mask(run, params, ["ab[MASK]cd[MASK]"], top_k=3)
  assert [len(predictions) for predictions in per_mask] == [3, 3]
  # Each filled text fills its own mask and leaves the other one.
  assert per_mask[0][0].filled_text.endswith("[MASK]")
  assert per_mask[1][0].filled_text.startswith("ab[MASK]cd")


def test_probabilities_equal_a_softmax_of_the_logits(bert):
  run, params = bert
  tok = run.tokenizer
  text = "hmpj[MASK]gdipk[MASK]m"
  [per_mask] = fill_mask(run, params, [text], top_k=4)
  ids = np.concatenate([[tok.cls_id], tok.encode(text), [tok.sep_id]])[None]
  logits = models.build_model(run.model_cfg).apply(
      {"params": params}, ids, np.zeros_like(ids), np.ones(ids.shape, bool))["mlm_logits"]
  probs = np.asarray(jax.nn.softmax(logits[0], axis=-1))  # [seq, vocab]
  positions = np.flatnonzero(ids[0] == tok.mask_id)
  assert len(positions) == 2
  for position, predictions in zip(positions, per_mask):
    expected = np.argsort(-probs[position])[:4]
    np.testing.assert_array_equal([p.token_id for p in predictions], expected)
    np.testing.assert_allclose([p.probability for p in predictions],
                               probs[position, expected], rtol=1e-5, atol=1e-6)


def test_batching_matches_one_at_a_time(bert):
  run, params = bert
  texts = ["a[MASK]", TEXT, "kk[MASK]pheocflppjlhknhmpjagdipkmpkoh[MASK]mpkahpkno"]
  batched = fill_mask(run, params, texts, top_k=5)
  for text, together in zip(texts, batched):
    [alone] = fill_mask(run, params, [text], top_k=5)
    assert len(alone) == len(together)
    for a, b in zip(alone, together):
      assert [p.token_id for p in a] == [p.token_id for p in b]
      # Tight: attending to the padding moves these probabilities by ~1e-5.
      np.testing.assert_allclose([p.probability for p in a],
                                 [p.probability for p in b], rtol=1e-6, atol=1e-7)


def test_wordpiece_keeps_the_mask_token_whole():
  """A lower-casing WordPiece still encodes [MASK] as the mask id."""
  tok = train_tokenizer("wordpiece", ["The cat sat on the mat. A dog ran."] * 20, 60)
  [ids] = frame_texts(tok, ["The CAT [MASK] on the[MASK]."], max_len=32)
  assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
  assert np.sum(ids == tok.mask_id) == 2
  with pytest.raises(ValueError, match=r"case-sensitive.*'\[mask\]'"):
    frame_texts(tok, ["the [mask] sat"], max_len=32)


def test_decoder_run_is_refused(trained_gpt):
  run = saved_run.open_run(trained_gpt)
  with pytest.raises(ValueError, match="needs a masked-LM encoder checkpoint.*decoder"):
    fill_mask(run, {}, ["a [MASK]"])


def test_encoder_without_mlm_head_is_refused(bert):
  run, params = bert
  bare = dataclasses.replace(run, model_cfg=run.model_cfg.replace(mlm=False))
  with pytest.raises(ValueError, match=r"masked-LM encoder checkpoint.*mlm=False"):
    fill_mask(bare, params, ["a [MASK]"])


def test_tokenizer_without_mask_token_is_refused(bert):
  run, params = bert
  bpe = train_tokenizer("bpe", ["abc abd abe"] * 10, 300)
  with pytest.raises(ValueError, match="has no cls, sep, mask token"):
    fill_mask(dataclasses.replace(run, tokenizer=bpe), params, ["a <mask>"])


@pytest.mark.parametrize("texts, match", [
    ([], "no texts given"),
    (["abc", "a [MASK]"], r"text 1 \('abc'\) has no mask token: write \[MASK\]"),
    (["a [MASK]", "x" * 70 + "[MASK]"],
     r"text 2 .* is 73 tokens with \[CLS\] and \[SEP\] \(71 \+ 2\), more than the"
     r" model's max_len 64"),
])
def test_bad_texts_are_named(bert, texts, match):
  run, params = bert
  with pytest.raises(ValueError, match=match):
    fill_mask(run, params, texts)


@pytest.mark.parametrize("top_k", [0, -1, 262])
def test_top_k_out_of_range(bert, top_k):
  run, params = bert
  with pytest.raises(ValueError, match=f"top_k must be .* 1 to .* 261, got {top_k}"):
    fill_mask(run, params, ["a [MASK]"], top_k=top_k)


def test_longest_text_that_fits(bert):
  run, params = bert
  [[predictions]] = fill_mask(run, params, ["x" * 61 + "[MASK]"], top_k=1)
  assert len(predictions) == 1


def test_cli_writes_json_and_rejects_bad_input(trained_bert, tmp_path):
  out = tmp_path / "fill.json"
  done = fusedlm("fill-mask", "--workdir", trained_bert, "--text", TEXT, "--text",
                 "ab[MASK]c[MASK]", "--top_k", "3", "--step", "20", "--output", out)
  assert done.returncode == 0, done.stderr
  assert "mask 2 of 2" in done.stdout and "step 20" in done.stdout
  record = json.loads(out.read_text())
  assert record["step"] == 20 and record["top_k"] == 3
  assert [r["text"] for r in record["results"]] == [TEXT, "ab[MASK]c[MASK]"]
  assert [len(r["masks"]) for r in record["results"]] == [1, 2]
  first = record["results"][0]["masks"][0]
  assert len(first) == 3 and set(first[0]) == {"token", "token_id", "probability",
                                               "filled_text"}

  bad = fusedlm("fill-mask", "--workdir", trained_bert, "--text", "no mask here")
  assert bad.returncode == 2
  assert "has no mask token: write [MASK]" in bad.stderr
  assert "Traceback" not in bad.stderr
