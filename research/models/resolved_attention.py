"""What each attention of a model resolves to on this backend, and why.

  calls = for_batch(model_cfg, objectives.get("causal"), batch)              # evaluation
  calls = for_batch(model_cfg, objective, batch, training=True)              # a train step
  calls = for_generation(model_cfg, batch=2, prompt_len=5, cache_len=69)     # prefill + a step
  print("\n".join(describe(calls, model_cfg)))

The model is traced abstractly (jax.eval_shape: no parameters, no compile,
nothing runs), and each attention call is recorded instead of run
(`research.models.attention.recording_attention_calls`): its layer, kind
(self- or cross-attention), lengths, and `kernels.explain_implementation`'s
answer for the call's own arguments on the device of `kernels.target` (the
default backend's first device unless a `target_device` context names
another). So "auto" shows as it resolves per call: on a Hopper GPU a
float32 model, or a relative-position bias past head dim 128, falls back to
the Triton kernel, and a decoding step takes mosaic's decoding path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusedlm.kernels import target
from fusedlm.research.models import abstract_params, build_model
from fusedlm.research.models.attention import AttentionCall, recording_attention_calls
from fusedlm.research.models.config import ModelConfig


def trace(fn, *args) -> list[AttentionCall]:
  """The attention calls of fn(*args) (args: arrays or jax.ShapeDtypeStructs)."""
  with recording_attention_calls() as calls:
    jax.eval_shape(fn, *args)
  return calls


def _shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                      tree)


def for_batch(model_cfg: ModelConfig, objective, batch: dict, *,
              training: bool = False) -> list[AttentionCall]:
  """The calls of the objective's forward pass on `batch` (arrays or shapes).

  training: as the train step runs it (not deterministic, a dropout stream),
  else as evaluation does.
  """
  model = build_model(model_cfg)

  def forward(params, batch):
    rngs = {"dropout": jax.random.key(0)} if training else None
    return objective.outputs(model, {"params": params}, batch,
                             deterministic=not training, rngs=rngs)
  return trace(forward, abstract_params(model_cfg), _shapes(batch))


def for_generation(model_cfg: ModelConfig, *, batch: int, prompt_len: int,
                   cache_len: int) -> list[AttentionCall]:
  """The calls of starting to decode `batch` prompts (a decoder's prefill; an
  encoder-decoder's source encoding and start token) and of one cached
  decoding step against `cache_len` slots."""
  model = build_model(model_cfg)
  params = abstract_params(model_cfg)
  ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
  if model_cfg.kind == "decoder":
    def start(params, ids):
      return model.apply({"params": params}, ids, max_len=cache_len, method="prefill")
  elif model_cfg.kind == "encoder_decoder":
    def start(params, ids):
      return model.apply({"params": params}, ids, jnp.ones(ids.shape, jnp.bool_),
                         jnp.zeros((ids.shape[0],), jnp.int32), max_len=cache_len,
                         method="start_decoding")
  else:
    raise ValueError(f"a model of kind {model_cfg.kind!r} does not generate.")

  def step(params, token, cache):
    return model.apply({"params": params}, token, cache, method="decode_step")
  with recording_attention_calls() as calls:
    _, cache = jax.eval_shape(start, params, ids)
    jax.eval_shape(step, params, jax.ShapeDtypeStruct((batch, 1), jnp.int32), cache)
  return calls


def describe(calls: list[AttentionCall], model_cfg: ModelConfig, device=None) -> list[str]:
  """Lines for a command's output: a heading, then one line per kind of call
  (its stack, self- or cross-attention, lengths, implementation and reason,
  in order of first appearance) with how many layers make it and the first
  and last of their module paths."""
  device = target.current_device() if device is None else device
  lines = [f"attention {model_cfg.attention!r} on {target.describe(device)}:"]
  groups: dict[tuple, list[AttentionCall]] = {}
  for call in calls:
    key = (call.path.split("/")[0], call.kind, call.q_len, call.kv_len, call.resolution)
    groups.setdefault(key, []).append(call)
  for group in groups.values():
    first, last = group[0], group[-1]
    where = first.path if len(group) == 1 else f"{first.path} .. {last.path}"
    lines.append(
        f"  {first.kind} x{len(group)} (q_len {first.q_len}, kv_len {first.kv_len}):"
        f" {first.resolution.implementation} ({first.resolution.reason}) [{where}]")
  return lines
