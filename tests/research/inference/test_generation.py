"""Generation: cached decoding equals recomputation, batching, end-of-text, seeds, CLI."""

import json

import jax
import numpy as np
import pytest

from fusedlm.research.inference.generation import generate, generate_text
from fusedlm.research.inference.sampling import Sampling
from fusedlm.research.models import build_model, random_params
from fusedlm.research.models import config as model_config
from fusedlm.research.runs.saved_run import open_run
from tests.commands import fusedlm

PROMPTS = ["bcd", "ponmlkji", "the quick brown fox"]  # 3, 8 and 19 tokens (bytes)
STEPS = 20  # new tokens; one value lets the tests share compiled programs


@pytest.fixture(scope="module")
def gpt(trained_gpt):
  """(run, params) of the trained tiny GPT's newest checkpoint."""
  run = open_run(trained_gpt)
  _, params = run.restore_params()
  return run, params


def _prompt_ids(run, texts=PROMPTS):
  return [run.tokenizer.encode(text) for text in texts]


def _greedy_by_recomputation(cfg, params, prompts, steps):
  """Greedy tokens from the full forward pass over each whole sequence, no cache.

  Each step reruns every row from its first token and takes the argmax at its
  last one. Rows are right-padded to one width so a single program serves
  every step: under causal attention the padding after a token cannot change
  its logits.
  """
  forward = jax.jit(lambda ids: build_model(cfg).apply({"params": params}, ids))
  sequences = [list(map(int, p)) for p in prompts]
  width = max(len(p) for p in prompts) + steps
  for _ in range(steps):
    ids = np.zeros((len(sequences), width), np.int32)
    for b, seq in enumerate(sequences):
      ids[b, :len(seq)] = seq
    logits = np.asarray(forward(ids))  # [batch, width, vocab]
    for b, seq in enumerate(sequences):
      seq.append(int(np.argmax(logits[b, len(seq) - 1])))
  return [np.array(seq[len(p):]) for seq, p in zip(sequences, prompts)]


def test_cached_greedy_equals_recomputation_token_for_token(gpt):
  run, params = gpt
  prompts = _prompt_ids(run)
  assert len({len(p) for p in prompts}) == 3  # ragged: the padding is exercised
  cached = generate(run.model_cfg, params, prompts, max_new_tokens=STEPS)
  expected = _greedy_by_recomputation(run.model_cfg, params, prompts, STEPS)
  for b, (got, want) in enumerate(zip(cached, expected)):
    assert got.dtype == np.int32 and got.shape == (STEPS,)
    np.testing.assert_array_equal(got, want, err_msg=f"prompt {b}")


def test_cached_greedy_equals_recomputation_rotary_past_max_len():
  # Random weights decode varied tokens (the briefly trained GPT repeats a few),
  # and rotary positions let prompt + new tokens exceed cfg.max_len (16 here).
  cfg = model_config.tiny_gpt(
      vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
      mlp_dim=64, max_len=16, dtype="float32", attention="xla", position="rotary")
  params = random_params(cfg, std=0.5)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 61, n) for n in (2, 5, 9)]
  cached = generate(cfg, params, prompts, max_new_tokens=16)
  expected = _greedy_by_recomputation(cfg, params, prompts, 16)
  for b, (got, want) in enumerate(zip(cached, expected)):
    np.testing.assert_array_equal(got, want, err_msg=f"prompt {b}")
  assert len(np.unique(np.concatenate(cached))) > 5


def test_a_batch_decodes_each_prompt_as_alone(gpt):
  run, params = gpt
  prompts = _prompt_ids(run)
  together = generate(run.model_cfg, params, prompts, max_new_tokens=STEPS)
  for b in (0, len(prompts) - 1):  # the shortest and the longest prompt
    alone = generate(run.model_cfg, params, [prompts[b]], max_new_tokens=STEPS)[0]
    np.testing.assert_array_equal(together[b], alone, err_msg=f"prompt {b}")


def test_rows_stop_after_their_first_end_of_text(gpt):
  run, params = gpt
  prompts = _prompt_ids(run)
  steps = STEPS
  free = generate(run.model_cfg, params, prompts, max_new_tokens=steps)
  # A token that some row emits and another row never does: as eos it must end
  # the first row right after it while the other runs to max_new_tokens.
  choices = [(int(t), a, b) for a in range(len(free)) for b in range(len(free))
             for t in free[a] if t not in free[b]]
  assert choices, f"every row emits the same tokens: {free}"
  eos, stopping, running = choices[0]
  stopped = generate(run.model_cfg, params, prompts, max_new_tokens=steps, eos_id=eos)
  for row, tokens in zip(free, stopped):
    hits = np.flatnonzero(row == eos)
    want = row[:hits[0] + 1] if hits.size else row
    np.testing.assert_array_equal(tokens, want)
  assert stopped[stopping][-1] == eos and len(stopped[stopping]) < steps
  assert len(stopped[running]) == steps and eos not in stopped[running]

  # Every row's first token as eos: all stop at once (the loop exits early).
  firsts = {int(row[0]) for row in free}
  if len(firsts) == 1:
    first = generate(run.model_cfg, params, prompts, max_new_tokens=steps,
                     eos_id=firsts.pop())
    assert [len(t) for t in first] == [1] * len(prompts)


def test_seed_reproduces_samples_and_another_seed_changes_them(gpt):
  run, params = gpt
  prompts = _prompt_ids(run)
  sampling = Sampling(temperature=1.0)
  draw = lambda seed: generate(run.model_cfg, params, prompts, max_new_tokens=STEPS,
                               sampling=sampling, seed=seed)
  first, again, other = draw(3), draw(3), draw(4)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(first, other))
  greedy = generate(run.model_cfg, params, prompts, max_new_tokens=STEPS)
  assert any(not np.array_equal(a, b) for a, b in zip(first, greedy))


def test_empty_prompt_starts_from_end_of_text(gpt):
  run, params = gpt
  eos = run.tokenizer.eos_id
  from_empty = generate(run.model_cfg, params, [np.array([], np.int32)],
                        max_new_tokens=8, eos_id=eos)
  from_eos = generate(run.model_cfg, params, [np.array([eos])],
                      max_new_tokens=8, eos_id=eos)
  np.testing.assert_array_equal(from_empty[0], from_eos[0])


def test_generate_text_decodes_with_the_runs_tokenizer(gpt):
  run, params = gpt
  texts = generate_text(run, params, PROMPTS, max_new_tokens=STEPS)
  tokens = generate(run.model_cfg, params, _prompt_ids(run), max_new_tokens=STEPS,
                    eos_id=run.tokenizer.eos_id, pad_id=run.tokenizer.pad_id)
  assert texts == [run.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[5, 6]], {"max_new_tokens": 0}, r"max_new_tokens must be an int >= 1, got 0"),
    ([], {}, "no prompts"),
    ([[5], []], {}, "prompt 1 is empty and there is no eos_id"),
    ([[5, 261]], {}, r"prompt 0 holds token id 261 at position 1, outside \[0, 261\)"),
    ([[-1]], {}, r"token id -1 .*outside \[0, 261\)"),
    ([[5.0]], {}, "prompt 0 has dtype float64; token ids must be integers"),
    ([[[5, 6]]], {}, r"prompt 0 must be a 1-D sequence.*\(1, 2\)"),
    ([list(range(5, 45))], {"max_new_tokens": 30},
     r"longest prompt \(prompt 0, 40 tokens\) \+ max_new_tokens \(30\) = 70 tokens"
     r" exceeds the model's 64 learned positions.*at most 24 new tokens fit"),
    ([list(range(5, 69))], {}, "shorten it to at most 63 tokens"),
    ([[5]], {"eos_id": 300}, r"eos_id \(300\) is not a token id"),
    ([[5]], {"pad_id": -1}, r"pad_id \(-1\) is not a token id"),
    ([[5]], {"sampling": {"temperature": 1.0}}, "sampling must be a research.inference.sampling"),
])
def test_bad_requests_raise_naming_the_problem(gpt, prompts, kwargs, message):
  run, params = gpt
  kwargs = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(ValueError, match=message):
    generate(run.model_cfg, params, [np.array(p) for p in prompts], **kwargs)


def test_an_encoder_checkpoint_is_refused():
  cfg = model_config.presets["tiny_bert"](vocab_size=261, max_len=64)
  with pytest.raises(ValueError, match="needs a decoder .*this one is an encoder"):
    generate(cfg, random_params(cfg), [np.array([5, 6])], max_new_tokens=4)


def _cli(*args):
  return fusedlm("generate", *args)


def test_cli_writes_the_samples_as_json(gpt, trained_gpt, tmp_path):
  run, params = gpt
  output = tmp_path / "samples" / "out.json"
  done = _cli("--workdir", trained_gpt, "--prompt", "bcd", "--prompt", "",
              "--max_new_tokens", 12, "--temperature", 0.8, "--top_k", 5,
              "--top_p", 0.9, "--seed", 7, "--step", 20, "--output", output)
  assert done.returncode == 0, done.stderr
  record = json.loads(output.read_text())
  assert record["step"] == 20 and record["seed"] == 7 and record["max_new_tokens"] == 12
  assert record["sampling"] == {"temperature": 0.8, "top_k": 5, "top_p": 0.9}
  assert [s["prompt"] for s in record["samples"]] == ["bcd", ""]
  assert record["samples"][0]["prompt_ids"] == run.tokenizer.encode("bcd").tolist()
  _, params_20 = run.restore_params(20)
  eos = run.tokenizer.eos_id
  expected = generate(
      run.model_cfg, params_20, [run.tokenizer.encode("bcd"), np.array([], np.int32)],
      max_new_tokens=12, sampling=Sampling(0.8, 5, 0.9), seed=7, eos_id=eos,
      pad_id=run.tokenizer.pad_id)
  for sample, tokens in zip(record["samples"], expected):
    assert sample["token_ids"] == tokens.tolist()
    assert sample["continuation"] == run.tokenizer.decode(tokens, skip_special_tokens=True)
    assert sample["stopped_at_eos"] == (tokens[-1] == eos)
  assert "--- prompt 0: 'bcd'" in done.stdout
  # Prefill over the 3-token prompt, then each step against 3 + 12 slots.
  assert [line.split(":")[0].strip() for line in record["attention"][1:]] == [
      "self-attention x2 (q_len 3, kv_len 3)", "self-attention x2 (q_len 1, kv_len 15)"]
  assert all(line in done.stdout for line in record["attention"])
  assert "bcd" + record["samples"][0]["continuation"] in done.stdout


def test_cli_bad_workdir_exits_with_a_clear_message(tmp_path):
  done = _cli("--workdir", tmp_path / "missing", "--prompt", "a")
  assert done.returncode == 2
  assert done.stderr.strip() == (
      f"fusedlm generate: error: no run folder at {tmp_path / 'missing'}")
