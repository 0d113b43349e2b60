"""Training-step parity with Hugging Face: same weights, batches and AdamW, step for step.

Each test builds a small transformers model (GPT2LMHeadModel, BertForPreTraining)
with transformers' own initialisation, imports those weights into fusedlm
(research.models.hf_import, whose forward parity tests/research/models/
test_hf_import.py checks), and trains both for STEPS steps on the same batches,
drawn from fusedlm's pipeline exactly as fusedlm train draws them
(objective.train_data, then batch(step)):

  fusedlm    research.training.steps' pmapped train step on 2 CPU devices (so the loss is
             normalised by the global count of targets, not per device), with
             research.training.optimizer's AdamW: warm-up + cosine, global-norm clipping,
             weight decay on weight matrices only;
  reference  the transformers model's own loss (labels=...), torch.optim.AdamW
             with decay on nn.Linear / Conv1D weights only,
             torch.nn.utils.clip_grad_norm_, and transformers' cosine schedule
             with warm-up and a floor (get_cosine_with_min_lr_schedule_with_warmup).

Per-step losses must agree to RTOL relative and the final parameters (mapped
back through the importer) closely. Dropout is 0 on both sides: the two cannot
draw the same masks. What a failure here means: one side's step differs (loss,
normalisation, decay mask, schedule, clipping, masking, heads); the message names
the first step or the parameter that disagrees.
"""

import json

import jax
import numpy as np
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from fusedlm.research import models, objectives, run_config
from fusedlm.research.data.synthetic import random_markov_source
from fusedlm.research.models.hf_import import load_hf_checkpoint
from fusedlm.research.runs.parallel import replicate, shard, unreplicate
from fusedlm.research.training import optimizer
from fusedlm.research.training import steps as steps_lib

STEPS = 60
DEVICES = 2
LOSS_RTOL = 1e-4
GRAD_NORM_RTOL = 1e-3
PARAM_TOLERANCE = dict(rtol=1e-3, atol=2e-5)


def _corpus(path):
  """A JSON Lines corpus of Markov-chain documents of 6 to 64 characters: short
  enough that causal windows pack several and NSP rows need padding."""
  source = random_markov_source(alphabet_size=16, concentration=0.3, seed=0)
  rng = np.random.default_rng(0)
  docs = source.sample(400, 64, rng)
  lengths = rng.integers(6, 65, size=len(docs))
  path.write_text("".join(json.dumps({"text": doc[:n]}) + "\n"
                          for doc, n in zip(docs, lengths)))
  return str(path)


def _config(objective: str, tmp_path, **optimizer_fields):
  """A pretraining run config on a small Markov corpus with the byte tokenizer."""
  config = run_config.defaults()
  config.objective = objective
  config.nsp = objective == "mlm"
  config.model.preset = "tiny_bert" if objective == "mlm" else "tiny_gpt"
  config.model.update(num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128,
                      max_len=32, dtype="float32", attention="xla", dropout=0.0)
  config.data.update(corpus=_corpus(tmp_path / "corpus.jsonl"), tokenizer="byte", vocab_size=261, seq_len=32,
                     cache_dir=str(tmp_path / "cache"))
  config.optimizer.update(**{**dict(
      learning_rate=3e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1,
      weight_decay=0.1, grad_clip_norm=0.5), **optimizer_fields})
  config.train.update(steps=STEPS, batch_size=8, seed=3)
  run_config.validate(config)
  return config


def _torch_optimizer(model: torch.nn.Module, opt_cfg, steps: int):
  """torch AdamW decaying the weights of linear layers only (not embeddings,
  LayerNorms, biases, or the output layer tied to the embedding), with
  transformers' warm-up + cosine schedule."""
  embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
  decay = {id(m.weight): m.weight for m in model.modules()
           if isinstance(m, (torch.nn.Linear, Conv1D)) and id(m.weight) not in embeddings}
  rest = {id(p): p for p in model.parameters() if id(p) not in decay}
  assert decay and rest
  adamw = torch.optim.AdamW(
      [{"params": list(decay.values()), "weight_decay": opt_cfg.weight_decay},
       {"params": list(rest.values()), "weight_decay": 0.0}],
      lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)
  schedule = transformers.get_cosine_with_min_lr_schedule_with_warmup(
      adamw, opt_cfg.warmup_steps, steps, min_lr_rate=opt_cfg.min_lr_ratio)
  return adamw, schedule


def _clip_by_global_norm(model: torch.nn.Module, max_norm: float) -> float:
  """Scales the gradients by max_norm / norm when the global norm exceeds it.

  torch.nn.utils.clip_grad_norm_ divides by norm + 1e-6, a relative change of
  ~1e-6 on every clipped step that compounds over a run; optax (and the
  definition) divide by the norm itself. Returns the norm before clipping.
  """
  grads = [p.grad for p in model.parameters() if p.grad is not None]
  norm = torch.nn.utils.get_total_norm(grads)
  if norm > max_norm:
    torch._foreach_mul_(grads, max_norm / norm)
  return float(norm)


class _Ours:
  """fusedlm's training: the run's optimizer and the pmapped train step."""

  def __init__(self, config, model_cfg, params):
    self.objective = objectives.get(config.objective)
    tx = optimizer.build_optimizer(config.optimizer, config.train.steps)
    self.devices = jax.local_devices()[:DEVICES]
    self.state = replicate(steps_lib.create(model_cfg, tx, config.train.seed, params=params),
                           self.devices)
    self.p_train, _ = steps_lib.pmapped_steps(models.build_model(model_cfg), tx,
                                              self.objective, self.devices)

  def step(self, batch) -> dict:
    """One update; the summarized metrics of the batch (loss, nsp_loss)."""
    self.state, sums = self.p_train(self.state, shard(batch, DEVICES))
    return objectives.summarize(unreplicate(sums))

  def params(self):
    return unreplicate(self.state.params)


def _train_both(config, data, model_cfg, torch_model, torch_loss, ours):
  """STEPS updates on both sides; (our losses, reference losses, reference
  gradient norms before clipping).

  The losses compared are the metrics' (loss_sum / count), which the train
  step reports beside, not from, the scalar it differentiates; the gradient
  norms (ours: the train step's grad_norm, before clipping) are what tie that
  scalar to the reference's: a loss weighted or normalised differently gives
  other gradients from the first step on (Adam's per-parameter scaling would
  hide much of it from the parameters over a short run).
  """
  adamw, schedule = _torch_optimizer(torch_model, config.optimizer, STEPS)
  torch_model.train()
  ours_losses, reference_losses, norms, ours_norms = [], [], [], []
  for step in range(STEPS):
    batch = data.train.batch(step)
    metrics = ours.step(batch)
    ours_losses.append(metrics["loss"] + metrics.get("nsp_loss", 0.0))
    ours_norms.append(metrics["grad_norm"])
    adamw.zero_grad()
    loss = torch_loss(torch_model, batch)
    loss.backward()
    norms.append(_clip_by_global_norm(torch_model, config.optimizer.grad_clip_norm))
    adamw.step()
    schedule.step()
    reference_losses.append(loss.item())
  norms = np.array(norms)
  diverged = np.flatnonzero(~np.isclose(ours_norms, norms, rtol=GRAD_NORM_RTOL))
  np.testing.assert_allclose(
      ours_norms, norms, rtol=GRAD_NORM_RTOL,
      err_msg=f"gradient norms differ first at step {diverged[:1]} (0-based)")
  return np.array(ours_losses), np.array(reference_losses), norms


def _assert_losses_agree(ours, reference):
  # Both must learn, or agreeing would prove little.
  assert reference[-5:].mean() < reference[:5].mean() - 0.3, reference
  diverged = np.flatnonzero(~np.isclose(ours, reference, rtol=LOSS_RTOL, atol=0))
  np.testing.assert_allclose(
      ours, reference, rtol=LOSS_RTOL, atol=0,
      err_msg=f"per-step losses differ first at step {diverged[:1]} (0-based)")


def _assert_params_agree(ours, torch_model, hf_dir, model_cfg):
  torch_model.save_pretrained(hf_dir)
  cfg, reference = load_hf_checkpoint(hf_dir, dtype="float32", attention="xla")
  assert cfg == model_cfg
  flat_ours = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
  for path, expected in jax.tree_util.tree_flatten_with_path(reference)[0]:
    if _is_key_bias(path):
      # Its gradient is zero (softmax ignores a shift shared by every key of a
      # query), so each side's trajectory is rounding noise rescaled by Adam:
      # only "it stays near zero" is comparable.
      np.testing.assert_array_less(np.abs(np.asarray(flat_ours[path])), 1e-3)
      np.testing.assert_array_less(np.abs(np.asarray(expected)), 1e-3)
      continue
    np.testing.assert_allclose(np.asarray(flat_ours[path]), np.asarray(expected),
                               **PARAM_TOLERANCE,
                               err_msg=f"final {jax.tree_util.keystr(path)} differs")


def _is_key_bias(path) -> bool:
  names = [getattr(k, "key", None) for k in path]
  return names[-2:] == ["key", "bias"]


def _imported(torch_model, hf_dir, model_cfg):
  """The reference's initial weights in fusedlm's tree, through the importer."""
  torch_model.save_pretrained(hf_dir)
  cfg, params = load_hf_checkpoint(hf_dir, dtype="float32", attention="xla")
  assert cfg == model_cfg, "the importer's config must be the run's model"
  return params


def _as_torch(x, dtype=torch.long):
  return torch.as_tensor(np.asarray(x)).to(dtype)


# --- GPT-2 ----------------------------------------------------------------------


def _gpt2_loss(model, batch):
  """GPT2LMHeadModel's loss on a packed causal batch.

  The windows pack several documents: attention stays within a segment
  (a 4-D additive mask), positions restart per document, and targets the
  pipeline masks out are -100; the targets are already shifted (shift_labels).
  """
  segments = np.asarray(batch["segment_ids"])
  length = segments.shape[1]
  allowed = ((segments[:, :, None] == segments[:, None, :])
             & np.tril(np.ones((length, length), bool))[None])
  mask = np.where(allowed, 0.0, np.finfo(np.float32).min)[:, None]  # [B, 1, T, T]
  labels = _as_torch(np.where(batch["loss_mask"] > 0, batch["targets"], -100))
  return model(input_ids=_as_torch(batch["inputs"]),
               position_ids=_as_torch(batch["positions"]),
               attention_mask=_as_torch(mask, torch.float32),
               labels=labels, shift_labels=labels).loss


def test_gpt2_training_matches_transformers(tmp_path):
  config = _config("causal", tmp_path)
  objective = objectives.get("causal")
  data = objective.train_data(config, None)
  model_cfg = objective.model_config(config, data.tokenizer.vocab_size)
  torch.manual_seed(0)
  torch_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=model_cfg.vocab_size, n_positions=model_cfg.max_len,
      n_embd=model_cfg.hidden_size, n_layer=model_cfg.num_layers,
      n_head=model_cfg.num_heads, n_inner=model_cfg.mlp_dim,
      activation_function="gelu_new", layer_norm_epsilon=model_cfg.layer_norm_eps,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=data.tokenizer.eos_id, eos_token_id=data.tokenizer.eos_id,
      attn_implementation="eager"))
  # Packed windows: the batch really spans document boundaries.
  assert (np.asarray(data.train.batch(0)["segment_ids"]).max(axis=1) > 1).any()
  ours = _Ours(config, model_cfg, _imported(torch_model, tmp_path / "init", model_cfg))

  ours_losses, reference_losses, norms = _train_both(
      config, data, model_cfg, torch_model, _gpt2_loss, ours)

  clip = config.optimizer.grad_clip_norm
  assert (norms > clip).any() and (norms < clip).any(), (
      f"clipping at {clip} should act on some steps, not all: {norms}")
  _assert_losses_agree(ours_losses, reference_losses)
  _assert_params_agree(ours.params(), torch_model, tmp_path / "final", model_cfg)


# --- BERT -----------------------------------------------------------------------


def _bert_loss(model, batch):
  """BertForPreTraining's loss: mean MLM cross-entropy over the masked positions
  of the whole batch plus mean NSP cross-entropy."""
  labels = np.where(batch["mlm_weights"] > 0, batch["mlm_labels"], -100)
  return model(input_ids=_as_torch(batch["input_ids"]),
               token_type_ids=_as_torch(batch["token_type_ids"]),
               attention_mask=_as_torch(batch["padding_mask"]),
               labels=_as_torch(labels),
               next_sentence_label=_as_torch(batch["nsp_labels"])).loss


def _assert_masking_like_bert(batches, tokenizer):
  """Selection rate and the 80/10/10 corruption of the batches both sides were fed,
  against transformers' DataCollatorForLanguageModeling's rates."""
  rates = dict(mlm_probability=0.15, mask_replace_prob=0.8, random_replace_prob=0.1)
  fields = transformers.DataCollatorForLanguageModeling.__dataclass_fields__
  for name, value in rates.items():  # the reference's defaults are BERT's recipe
    assert fields[name].default == value, name
  special = np.zeros(tokenizer.vocab_size, bool)
  special[list(tokenizer.special_ids)] = True
  selected = np.concatenate([b["mlm_weights"].ravel() > 0 for b in batches])
  inputs = np.concatenate([b["input_ids"].ravel() for b in batches])
  labels = np.concatenate([b["mlm_labels"].ravel() for b in batches])
  original = np.where(selected, labels, inputs)
  maskable = np.concatenate([b["padding_mask"].ravel() for b in batches]) & ~special[original]
  assert not (selected & ~maskable).any(), "a special or padding position was selected"
  n = selected.sum()
  as_mask = (inputs[selected] == tokenizer.mask_id).mean()
  unchanged = (inputs[selected] == labels[selected]).mean()
  # A random replacement may draw the original token: 1 in len(regular_ids).
  redraw = rates["random_replace_prob"] / len(tokenizer.regular_ids)
  observed = {"selected": selected.sum() / maskable.sum(), "[MASK]": as_mask,
              "random": 1.0 - as_mask - unchanged, "unchanged": unchanged}
  expected = {"selected": rates["mlm_probability"], "[MASK]": rates["mask_replace_prob"],
              "random": rates["random_replace_prob"] - redraw,
              "unchanged": 1 - rates["mask_replace_prob"] - rates["random_replace_prob"]
                           + redraw}
  for name, p in expected.items():
    trials = maskable.sum() if name == "selected" else n
    # 4 binomial standard errors: the batches are fixed, so this never flakes;
    # it catches a rate off by a few points (e.g. 90/5/5 or 80/20/0).
    tolerance = 4 * np.sqrt(p * (1 - p) / trials)
    assert abs(observed[name] - p) < tolerance, (name, observed, expected)


def test_bert_pretraining_matches_transformers(tmp_path):
  config = _config("mlm", tmp_path, b2=0.98, grad_clip_norm=2.5)
  objective = objectives.get("mlm")
  data = objective.train_data(config, None)
  model_cfg = objective.model_config(config, data.tokenizer.vocab_size)
  assert model_cfg.nsp and model_cfg.mlm and model_cfg.norm == "post"
  torch.manual_seed(0)
  torch_model = transformers.BertForPreTraining(transformers.BertConfig(
      vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
      num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
      intermediate_size=model_cfg.mlp_dim, max_position_embeddings=model_cfg.max_len,
      type_vocab_size=model_cfg.type_vocab_size, layer_norm_eps=model_cfg.layer_norm_eps,
      hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      pad_token_id=data.tokenizer.pad_id, attn_implementation="eager"))
  # The MLM bias starts at zero in both; start it elsewhere so that its
  # updates (and the tying of the decoder's bias to it) show in the losses.
  with torch.no_grad():
    torch_model.cls.predictions.bias.normal_(0.0, 0.5)
  batches = [data.train.batch(step) for step in range(STEPS)]
  _assert_masking_like_bert(batches, data.tokenizer)
  labels = np.concatenate([b["nsp_labels"] for b in batches])
  assert 0.3 < labels.mean() < 0.7, "NSP batches should mix both labels"
  assert (np.concatenate([b["padding_mask"] for b in batches]) == 0).any(), (
      "some rows should be padded, so the attention mask is exercised")
  ours = _Ours(config, model_cfg, _imported(torch_model, tmp_path / "init", model_cfg))

  ours_losses, reference_losses, norms = _train_both(
      config, data, model_cfg, torch_model, _bert_loss, ours)

  clip = config.optimizer.grad_clip_norm
  assert (norms > clip).any() and (norms < clip).any(), (
      f"clipping at {clip} should act on some steps, not all: {norms}")
  _assert_losses_agree(ours_losses, reference_losses)
  _assert_params_agree(ours.params(), torch_model, tmp_path / "final", model_cfg)
