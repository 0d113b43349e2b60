"""Build our ModelConfig and parameters from a local Hugging Face checkpoint.

  cfg, params = load_hf_checkpoint("/path/to/bert-base-uncased", dtype="float32")
  outputs = build_model(cfg).apply({"params": params}, input_ids, ...)

Reads only files in the directory (config.json, then model.safetensors, its
sharded index, or pytorch_model.bin), never the network. Supported
`architectures`: BertModel, BertForMaskedLM, BertForPreTraining and
GPT2LMHeadModel. The parameters are float32 and form exactly the tree that
`build_model(cfg).init` produces; anything else is a ValueError that names
the architecture, config option or tensors at fault.

Attention dropout (attention_probs_dropout_prob / attn_pdrop) carries over:
the kernel applies it in training only. What does not carry over, by design:
  * GPT-2's embd_pdrop: our one hidden `dropout` takes resid_pdrop;
  * BertModel's pooler: our encoder builds a pooler only for NSP or
    classification, which BertModel has no weights for (mlm=False, nsp=False).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np

from fusedlm.research.models import abstract_params
from fusedlm.research.models.config import ModelConfig

BERT_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
GPT2_ARCHITECTURES = ("GPT2LMHeadModel",)
SUPPORTED_ARCHITECTURES = BERT_ARCHITECTURES + GPT2_ARCHITECTURES
# Config fields a caller may change on import without changing the parameters.
RUNTIME_FIELDS = ("dtype", "attention", "remat", "dropout")
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh"}


def load_hf_checkpoint(path, **runtime_overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, float32 params) from a Hugging Face model directory.

  runtime_overrides may set any of RUNTIME_FIELDS, e.g. dtype="float32" for
  exact parity or attention="pallas".
  """
  directory = pathlib.Path(path)
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise ValueError(f"no config.json in {directory}.")
  try:
    hf = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file} is not valid JSON (truncated?): {e}") from e
  architecture = _architecture(hf, config_file)
  bad = sorted(set(runtime_overrides) - set(RUNTIME_FIELDS))
  if bad:
    raise ValueError(
        f"cannot override {bad} on import: they change the parameters; only"
        f" {list(RUNTIME_FIELDS)} may be set.")
  tensors = _Tensors(read_state_dict(directory), directory)
  if architecture in BERT_ARCHITECTURES:
    cfg = bert_config(hf, architecture).replace(**runtime_overrides)
    flat = _bert_params(tensors, cfg)
  else:
    cfg = gpt2_config(hf).replace(**runtime_overrides)
    flat = _gpt2_params(tensors, cfg)
  tensors.raise_if_missing(architecture)
  return cfg, _assemble(flat, cfg, architecture)


def _architecture(hf: dict, config_file) -> str:
  names = hf.get("architectures") or []
  if not names:
    raise ValueError(
        f"{config_file} names no `architectures`; supported:"
        f" {', '.join(SUPPORTED_ARCHITECTURES)}.")
  if names[0] not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
        f"unsupported architecture {names[0]!r} in {config_file}; supported:"
        f" {', '.join(SUPPORTED_ARCHITECTURES)}.")
  return names[0]


def _require(hf: dict, option: str, expected, architecture: str):
  value = hf.get(option, expected)
  if value != expected:
    raise ValueError(
        f"unsupported {architecture} option {option}={value!r} (only"
        f" {expected!r} is implemented).")


def _activation(name: str, architecture: str) -> str:
  if name not in _ACTIVATIONS:
    raise ValueError(
        f"unsupported {architecture} activation {name!r}; supported:"
        f" {', '.join(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


def bert_config(hf: dict, architecture: str) -> ModelConfig:
  """Our encoder config for a Hugging Face BertConfig dict."""
  for option, expected in (("position_embedding_type", "absolute"),
                           ("is_decoder", False),
                           ("add_cross_attention", False)):
    _require(hf, option, expected, architecture)
  return ModelConfig(
      kind="encoder",
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"],
      max_len=hf["max_position_embeddings"],
      position="learned",
      norm="post",
      activation=_activation(hf.get("hidden_act", "gelu"), architecture),
      dropout=float(hf.get("hidden_dropout_prob", 0.1)),
      attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
      init_std=float(hf.get("initializer_range", 0.02)),  # new heads (fine-tuning)
      type_vocab_size=hf.get("type_vocab_size", 2),
      mlm=architecture in ("BertForMaskedLM", "BertForPreTraining"),
      nsp=architecture == "BertForPreTraining",
  )


def gpt2_config(hf: dict) -> ModelConfig:
  """Our decoder config for a Hugging Face GPT2Config dict."""
  architecture = "GPT2LMHeadModel"
  for option, expected in (("scale_attn_weights", True),
                           ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False),
                           ("tie_word_embeddings", True)):
    _require(hf, option, expected, architecture)
  hidden = hf["n_embd"]
  return ModelConfig(
      kind="decoder",
      vocab_size=hf["vocab_size"],
      hidden_size=hidden,
      num_layers=hf["n_layer"],
      num_heads=hf["n_head"],
      mlp_dim=hf.get("n_inner") or 4 * hidden,
      max_len=hf["n_positions"],
      position="learned",
      norm="pre",
      activation=_activation(hf.get("activation_function", "gelu_new"),
                             architecture),
      dropout=float(hf.get("resid_pdrop", 0.1)),
      attention_dropout=float(hf.get("attn_pdrop", 0.1)),
      layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      init_std=float(hf.get("initializer_range", 0.02)),  # new heads (fine-tuning)
  )


def read_state_dict(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint as float32 numpy, by Hugging Face name."""
  single = directory / "model.safetensors"
  index = directory / "model.safetensors.index.json"
  torch_single = directory / "pytorch_model.bin"
  torch_index = directory / "pytorch_model.bin.index.json"
  if single.is_file():
    files, reader = [single], _read_safetensors
  elif index.is_file():
    files, reader = _shards(index), _read_safetensors
  elif torch_single.is_file():
    files, reader = [torch_single], _read_torch
  elif torch_index.is_file():
    files, reader = _shards(torch_index), _read_torch
  else:
    raise ValueError(
        f"no weights in {directory}: expected model.safetensors,"
        " model.safetensors.index.json or pytorch_model.bin.")
  tensors = {}
  for file in files:
    tensors.update(reader(file))
  # Old BERT checkpoints name LayerNorm parameters gamma and beta.
  return {_modern_name(k): v for k, v in tensors.items()}


def _shards(index: pathlib.Path) -> list[pathlib.Path]:
  weight_map = json.loads(index.read_text())["weight_map"]
  return [index.parent / name for name in sorted(set(weight_map.values()))]


def _read_safetensors(file) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  # The flax reader handles bfloat16, which numpy cannot hold natively.
  try:
    with safe_open(str(file), framework="flax") as f:
      return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  except Exception as e:  # safetensors raises its own SafetensorError, and OSError
    raise ValueError(f"cannot read the weights in {file} (truncated or not a"
                     f" safetensors file?): {type(e).__name__}: {e}") from e


def _read_torch(file) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=import-outside-toplevel
  state = torch.load(file, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


def _modern_name(name: str) -> str:
  if "LayerNorm" in name:
    if name.endswith(".gamma"):
      return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
      return name[: -len("beta")] + "bias"
  return name


class _Tensors:
  """Name lookup that tries optional prefixes and remembers what was missing."""

  def __init__(self, tensors: dict[str, np.ndarray], directory):
    self.tensors = tensors
    self.directory = directory
    self.missing: list[str] = []

  def get(self, name: str, prefixes=("",)) -> np.ndarray | None:
    for prefix in prefixes:
      if prefix + name in self.tensors:
        return self.tensors[prefix + name]
    self.missing.append(" or ".join(prefix + name for prefix in prefixes))
    return None

  def check_shape(self, name: str, prefixes, value, expected: tuple[int, ...]):
    """ValueError naming the tensor when its shape is not the one the config implies."""
    if value is not None and tuple(value.shape) != tuple(expected):
      found = next(prefix + name for prefix in prefixes if prefix + name in self.tensors)
      raise ValueError(
          f"{found} has shape {tuple(value.shape)} in {self.directory}, but its"
          f" config.json (hidden_size, num_attention_heads, ...) implies"
          f" {tuple(expected)}: the weights do not belong to this config.")

  def raise_if_missing(self, architecture: str):
    if self.missing:
      shown = ", ".join(self.missing[:20])
      more = f" and {len(self.missing) - 20} more" if len(self.missing) > 20 else ""
      raise ValueError(
          f"{architecture} checkpoint in {self.directory} lacks tensors the"
          f" model needs: {shown}{more}.")


def _linear(tensors, name, prefixes, transpose: bool, shape: tuple[int, int] | None = None):
  """{kernel [in, out], bias [out]} of a torch Linear (weight [out, in]) or Conv1D.

  shape: the [in, out] the config implies; a tensor of another shape is
  refused naming it, its shape in the file and the shape expected there.
  """
  weight = tensors.get(name + ".weight", prefixes)
  bias = tensors.get(name + ".bias", prefixes)
  if shape is not None:
    stored = tuple(reversed(shape)) if transpose else tuple(shape)
    tensors.check_shape(name + ".weight", prefixes, weight, stored)
    tensors.check_shape(name + ".bias", prefixes, bias, (shape[1],))
  if weight is not None and transpose:
    weight = weight.T
  return {"kernel": weight, "bias": bias}


def _norm(tensors, name, prefixes):
  return {"scale": tensors.get(name + ".weight", prefixes),
          "bias": tensors.get(name + ".bias", prefixes)}


def _split_heads(linear, cfg: ModelConfig, output: bool = False):
  """Reshapes a fused [hidden, heads * head_dim] projection to per-head axes."""
  kernel, bias = linear["kernel"], linear["bias"]
  heads, head_dim = cfg.num_heads, cfg.head_dim
  if output:  # [heads * head_dim, hidden] -> [heads, head_dim, hidden]
    kernel = None if kernel is None else kernel.reshape(heads, head_dim, -1)
    return {"kernel": kernel, "bias": bias}
  kernel = None if kernel is None else kernel.reshape(-1, heads, head_dim)
  bias = None if bias is None else bias.reshape(heads, head_dim)
  return {"kernel": kernel, "bias": bias}


def _check_tied(tensors, decoder_name: str, embedding, what: str):
  decoder = tensors.tensors.get(decoder_name)
  if decoder is not None and embedding is not None and not np.array_equal(
      decoder, embedding):
    raise ValueError(
        f"{decoder_name} differs from the {what}: untied output layers are"
        " not supported (ours is tied to the token embedding).")


def _bert_params(tensors: _Tensors, cfg: ModelConfig) -> dict:
  trunk = ("bert.", "")  # BertModel saved alone has no "bert." prefix
  width = cfg.hidden_size
  word = tensors.get("embeddings.word_embeddings.weight", trunk)
  params: dict[str, Any] = {
      "embeddings": {
          "token": {"embedding": word},
          "position": {"embedding": tensors.get(
              "embeddings.position_embeddings.weight", trunk)},
          "token_type": {"embedding": tensors.get(
              "embeddings.token_type_embeddings.weight", trunk)},
          "norm": _norm(tensors, "embeddings.LayerNorm", trunk),
      },
      "transformer": {},
  }
  for i in range(cfg.num_layers):
    layer = f"encoder.layer.{i}."
    attention = {
        proj: _split_heads(_linear(
            tensors, f"{layer}attention.self.{proj}", trunk, True, (width, width)), cfg)
        for proj in ("query", "key", "value")
    }
    attention["out"] = _split_heads(_linear(
        tensors, f"{layer}attention.output.dense", trunk, True, (width, width)), cfg,
        output=True)
    params["transformer"][f"layer_{i}"] = {
        "attention": attention,
        "attention_norm": _norm(tensors, f"{layer}attention.output.LayerNorm", trunk),
        "mlp": {
            "up": _linear(tensors, f"{layer}intermediate.dense", trunk, True,
                          (width, cfg.mlp_dim)),
            "down": _linear(tensors, f"{layer}output.dense", trunk, True,
                            (cfg.mlp_dim, width)),
        },
        "mlp_norm": _norm(tensors, f"{layer}output.LayerNorm", trunk),
    }
  if cfg.has_pooler:
    params["pooler"] = {"dense": _linear(tensors, "pooler.dense", trunk, True)}
  if cfg.mlm:
    params["mlm_transform"] = {
        "dense": _linear(tensors, "cls.predictions.transform.dense", ("",), True),
        "norm": _norm(tensors, "cls.predictions.transform.LayerNorm", ("",)),
    }
    params["mlm_bias"] = tensors.get("cls.predictions.bias")
    _check_tied(tensors, "cls.predictions.decoder.weight", word,
                "word embedding")
  if cfg.nsp:
    params["nsp_head"] = _linear(tensors, "cls.seq_relationship", ("",), True)
  return params


def _gpt2_params(tensors: _Tensors, cfg: ModelConfig) -> dict:
  trunk = ("transformer.", "")
  width = cfg.hidden_size
  wte = tensors.get("wte.weight", trunk)
  params: dict[str, Any] = {
      "embeddings": {
          "token": {"embedding": wte},
          "position": {"embedding": tensors.get("wpe.weight", trunk)},
      },
      "transformer": {"final_norm": _norm(tensors, "ln_f", trunk)},
  }
  for i in range(cfg.num_layers):
    block = f"h.{i}."
    # GPT-2's Conv1D stores [in, out]: no transpose. c_attn fuses q, k, v.
    fused = _linear(tensors, f"{block}attn.c_attn", trunk, False, (width, 3 * width))
    attention = {}
    for j, proj in enumerate(("query", "key", "value")):
      part = {
          key: None if value is None else np.split(value, 3, axis=-1)[j]
          for key, value in fused.items()
      }
      attention[proj] = _split_heads(part, cfg)
    attention["out"] = _split_heads(_linear(
        tensors, f"{block}attn.c_proj", trunk, False, (width, width)), cfg, output=True)
    params["transformer"][f"layer_{i}"] = {
        "attention": attention,
        "attention_norm": _norm(tensors, f"{block}ln_1", trunk),
        "mlp": {
            "up": _linear(tensors, f"{block}mlp.c_fc", trunk, False, (width, cfg.mlp_dim)),
            "down": _linear(tensors, f"{block}mlp.c_proj", trunk, False,
                            (cfg.mlp_dim, width)),
        },
        "mlp_norm": _norm(tensors, f"{block}ln_2", trunk),
    }
  _check_tied(tensors, "lm_head.weight", wte, "token embedding (wte)")
  return params


def _assemble(params: dict, cfg: ModelConfig, architecture: str) -> dict:
  """Checks the tree against build_model(cfg).init; returns it as param_dtype arrays."""
  expected = abstract_params(cfg)
  got_paths = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(params)[0]}
  want = jax.tree_util.tree_flatten_with_path(expected)[0]
  want_paths = {jax.tree_util.keystr(p) for p, _ in want}
  if got_paths != want_paths:
    raise ValueError(
        f"{architecture} conversion built the wrong tree: missing"
        f" {sorted(want_paths - got_paths)}, unexpected"
        f" {sorted(got_paths - want_paths)}.")
  shapes = {jax.tree_util.keystr(p): x.shape for p, x in want}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    if value.shape != shapes[name]:
      raise ValueError(
          f"{architecture} tensor for {name} has shape {value.shape}, but the"
          f" config (from config.json) implies {shapes[name]}.")
  return jax.tree_util.tree_map(
      lambda x: jax.numpy.asarray(x, cfg.params_dtype), params)
