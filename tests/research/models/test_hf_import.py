"""Hugging Face import: parity with tiny random transformers models, clear errors.

The PyTorch models are built from configs on the CPU, randomised (LayerNorm
scales and biases too, so a swapped tensor cannot hide), saved with
save_pretrained into tmp_path and imported; nothing is downloaded.
"""

import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from fusedlm.research.models import build_model
from fusedlm.research.models.hf_import import load_hf_checkpoint

TOLERANCE = dict(rtol=1e-4, atol=1e-4)
VOCAB = 97


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  torch.manual_seed(seed)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn_like(parameter))
  return model.eval()


def _bert(architecture: str, tmp_path, seed=0):
  config = transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=64, max_position_embeddings=24,
      type_vocab_size=2, pad_token_id=0)
  model = _randomise(getattr(transformers, architecture)(config), seed)
  model.save_pretrained(tmp_path)
  return model


def _gpt2(tmp_path, seed=0, **config_changes):
  config = transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=24, n_embd=32, n_layer=2, n_head=4,
      bos_token_id=0, eos_token_id=0, **config_changes)
  model = _randomise(transformers.GPT2LMHeadModel(config), seed)
  model.save_pretrained(tmp_path)
  return model


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, VOCAB, (2, 12)).astype(np.int32)
  token_types = (np.arange(12)[None] >= np.array([[5], [4]])).astype(np.int32)
  padding_mask = np.arange(12)[None] < np.array([[12], [9]])
  return ids, token_types, padding_mask


def _ours(cfg, params, *inputs):
  """(outputs, [embeddings, layer_0, ..., layer_{L-1}] hidden states)."""

  @jax.jit
  def run(params, *inputs):
    return build_model(cfg).apply(
        {"params": params}, *inputs, capture_intermediates=True,
        mutable=["intermediates"])

  outputs, state = run(params, *inputs)
  captured = state["intermediates"]
  layers = [captured["transformer"][f"layer_{i}"]["__call__"][0][0]
            for i in range(cfg.num_layers)]
  return outputs, [captured["embeddings"]["__call__"][0]] + layers


@pytest.mark.parametrize(
    "architecture", ["BertModel", "BertForMaskedLM", "BertForPreTraining"])
def test_bert_matches_transformers(architecture, tmp_path):
  torch_model = _bert(architecture, tmp_path)
  cfg, params = load_hf_checkpoint(tmp_path, dtype="float32", attention="xla")
  assert (cfg.kind, cfg.norm, cfg.mlm, cfg.nsp) == (
      "encoder", "post", architecture != "BertModel",
      architecture == "BertForPreTraining")
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
  ids, token_types, padding_mask = _inputs()
  outputs, hidden = _ours(cfg, params, ids, token_types, padding_mask)
  with torch.no_grad():
    expected = torch_model(
        input_ids=torch.tensor(ids, dtype=torch.long),
        token_type_ids=torch.tensor(token_types, dtype=torch.long),
        attention_mask=torch.tensor(padding_mask, dtype=torch.long),
        output_hidden_states=True)
  for i, (ours, theirs) in enumerate(zip(hidden, expected.hidden_states)):
    np.testing.assert_allclose(ours, theirs.numpy(), **TOLERANCE,
                               err_msg=f"hidden state {i}")
  np.testing.assert_allclose(outputs["hidden"], expected.hidden_states[-1].numpy(),
                             **TOLERANCE)
  if architecture == "BertForMaskedLM":
    np.testing.assert_allclose(outputs["mlm_logits"], expected.logits.numpy(),
                               **TOLERANCE)
  if architecture == "BertForPreTraining":
    np.testing.assert_allclose(
        outputs["mlm_logits"], expected.prediction_logits.numpy(), **TOLERANCE)
    np.testing.assert_allclose(
        outputs["nsp_logits"], expected.seq_relationship_logits.numpy(),
        **TOLERANCE)


@pytest.mark.parametrize("weights", ["safetensors", "pytorch_bin"])
def test_gpt2_matches_transformers(weights, tmp_path):
  torch_model = _gpt2(tmp_path)
  if weights == "pytorch_bin":
    # An old-style directory: the full state dict, tied lm_head included.
    (tmp_path / "model.safetensors").unlink()
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
  cfg, params = load_hf_checkpoint(tmp_path, dtype="float32", attention="xla")
  assert (cfg.kind, cfg.norm, cfg.activation) == ("decoder", "pre", "gelu_tanh")
  ids, _, _ = _inputs(1)
  logits, hidden = _ours(cfg, params, ids)
  with torch.no_grad():
    expected = torch_model(torch.tensor(ids, dtype=torch.long),
                           output_hidden_states=True)
  # transformers' last hidden state is after ln_f; ours is the block output.
  for i in range(cfg.num_layers):
    np.testing.assert_allclose(hidden[i], expected.hidden_states[i].numpy(),
                               **TOLERANCE, err_msg=f"hidden state {i}")
  np.testing.assert_allclose(logits, expected.logits.numpy(), **TOLERANCE)


def test_a_missing_tensor_is_named(tmp_path):
  _bert("BertForPreTraining", tmp_path)
  file = tmp_path / "model.safetensors"
  tensors = safetensors.torch.load_file(file)
  del tensors["bert.encoder.layer.1.output.dense.weight"]
  del tensors["cls.seq_relationship.bias"]
  safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ValueError) as error:
    load_hf_checkpoint(tmp_path)
  assert "bert.encoder.layer.1.output.dense.weight" in str(error.value)
  assert "cls.seq_relationship.bias" in str(error.value)


def test_an_unsupported_architecture_is_named(tmp_path):
  _bert("BertForSequenceClassification", tmp_path)
  with pytest.raises(ValueError, match="'BertForSequenceClassification'"):
    load_hf_checkpoint(tmp_path)


def test_an_unsupported_option_is_named(tmp_path):
  _gpt2(tmp_path, scale_attn_by_inverse_layer_idx=True)
  with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
    load_hf_checkpoint(tmp_path)


def test_overrides_that_change_the_parameters_are_refused(tmp_path):
  _gpt2(tmp_path)
  with pytest.raises(ValueError, match=r"cannot override \['num_layers'\]"):
    load_hf_checkpoint(tmp_path, num_layers=3)
  config = json.loads((tmp_path / "config.json").read_text())
  config["architectures"] = []
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="names no `architectures`"):
    load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_a_config_that_does_not_fit_the_weights_names_the_tensor(model, tmp_path):
  # The weights of a 32-wide model under a config that says 48 wide.
  _bert("BertForMaskedLM", tmp_path) if model == "bert" else _gpt2(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["hidden_size" if model == "bert" else "n_embd"] = 48
  (tmp_path / "config.json").write_text(json.dumps(config))
  name = ("bert.encoder.layer.0.attention.self.query.weight" if model == "bert"
          else "transformer.h.0.attn.c_attn.weight")
  stored, implied = ((32, 32), (48, 48)) if model == "bert" else ((32, 96), (48, 144))
  with pytest.raises(ValueError) as error:
    load_hf_checkpoint(tmp_path)
  assert str(error.value).startswith(
      f"{name} has shape {stored} in {tmp_path}, but its config.json (hidden_size,"
      f" num_attention_heads, ...) implies {implied}"), error.value
