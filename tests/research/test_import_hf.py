"""fusedlm import-hf: a Hugging Face folder becomes a run that evaluate,
fill_mask, generate and finetune open. The folders are tiny random
transformers models saved into tmp_path; nothing is downloaded."""


import jax
import numpy as np
import pytest
import torch
import transformers

from fusedlm.research import import_hf
from fusedlm.research.data import train_tokenizer
from fusedlm.research.inference import masked_lm
from fusedlm.research.inference.generation import generate_text
from fusedlm.research.models.hf_import import load_hf_checkpoint
from fusedlm.research.runs import saved_run
from fusedlm.research.training import eval_loop
from tests.commands import fusedlm

WORDS = ("the a of to and in is it that for on with as list return value file"
         " name module function class data string number").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_folder(path):
  """BertForPreTraining (MLM + NSP heads) with a WordPiece vocab.txt."""
  vocab = SPECIALS + WORDS + list("abcdefghijklmnopqrstuvwxyz.,") + [
      f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
  config = transformers.BertConfig(
      vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.BertForPreTraining(config).eval()
  model.save_pretrained(path)
  (path / "vocab.txt").write_text("".join(token + "\n" for token in vocab))
  return path


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
  hf = _bert_folder(tmp_path_factory.mktemp("hf_bert"))
  workdir = tmp_path_factory.mktemp("runs") / "bert"
  run = import_hf.import_hf(hf, workdir, dtype="float32", attention="xla")
  return hf, run


def test_the_imported_run_holds_the_hf_parameters(bert_run):
  hf, run = bert_run
  assert run.objective == "mlm" and run.config.nsp and run.model_cfg.nsp
  assert run.steps == (0,) and run.tokenizer.kind == "wordpiece"
  _, want = load_hf_checkpoint(hf, dtype="float32", attention="xla")
  step, params = run.restore_params()
  assert step == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, want)


def test_evaluate_and_fill_mask_open_it(bert_run, tmp_path):
  _, run = bert_run
  notes = tmp_path / "notes"  # two documents: NSP draws its random B from another one
  notes.mkdir()
  (notes / "a.txt").write_text("return the value of the list.\n" * 8)
  (notes / "b.txt").write_text("the name of the module is a string.\n" * 8)
  result = eval_loop.evaluate_run(run.workdir, data=str(notes), batch_size=8)
  metrics = result["metrics"]
  assert metrics["tokens"] > 0 and np.isfinite(metrics["loss"])
  assert 0.0 <= metrics["accuracy"] <= 1.0 and "nsp_accuracy" in metrics
  _, params = run.restore_params()
  (per_mask,), = masked_lm.fill_mask(run, params, ["return the [MASK] of the list."], top_k=3)
  assert len(per_mask) == 3
  probabilities = [p.probability for p in per_mask]
  assert probabilities == sorted(probabilities, reverse=True) and 0 < probabilities[0] <= 1


def test_a_gpt2_folder_becomes_a_causal_run_that_generates(tmp_path):
  hf = tmp_path / "gpt2"
  tokenizer = train_tokenizer("byte", [])  # 256 bytes + specials, saved as tokenizer.json
  config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32,
                                   n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                   eos_token_id=0)
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(config).eval().save_pretrained(hf)
  tokenizer.save(hf)
  run = import_hf.import_hf(hf, tmp_path / "run", dtype="float32", attention="xla")
  assert run.objective == "causal" and run.model_cfg.kind == "decoder"
  _, params = run.restore_params()
  texts = generate_text(run, params, ["the list"], max_new_tokens=4)
  assert len(texts) == 1 and isinstance(texts[0], str)


def test_bad_imports_are_refused(bert_run, tmp_path):
  hf, run = bert_run
  with pytest.raises(ValueError, match="already holds a run"):
    import_hf.import_hf(hf, run.workdir)
  with pytest.raises(FileNotFoundError, match="no Hugging Face model folder"):
    import_hf.import_hf(tmp_path / "missing", tmp_path / "out")
  bare = tmp_path / "bare"
  bare.mkdir()
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
    import_hf.import_hf(bare, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_the_command_line(bert_run, tmp_path):
  hf, _ = bert_run
  done = fusedlm("import-hf", "--hf", hf, "--workdir", tmp_path / "cli", "--dtype", "float32")
  assert done.returncode == 0, done.stderr
  assert "objective mlm" in done.stdout and saved_run.open_run(tmp_path / "cli").steps == (0,)
  again = fusedlm("import-hf", "--hf", hf, "--workdir", tmp_path / "cli")
  assert again.returncode == 2
  assert again.stderr.strip().endswith("already holds a run; import into a new --workdir.")


def test_truncated_weights_are_named(tmp_path):
  hf = _bert_folder(tmp_path / "bert")
  weights = hf / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])
  with pytest.raises(ValueError, match=r"cannot read the weights in .*model.safetensors"):
    import_hf.import_hf(hf, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  (hf / "config.json").write_text("{\"architectures\": [\"BertFor")
  with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
    import_hf.import_hf(hf, tmp_path / "run")
