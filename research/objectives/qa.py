"""Extractive question answering: a pretrained encoder fine-tuned with a span
head (fusedlm finetune), scored with SQuAD's exact match and F1.

An experiment starts from `run_config.finetune_defaults("qa")` (fine-tuning's,
with these data and decoding fields in place of the classification ones):

  config.data.task           "stdlib_qa" (built in, research.data.stdlib_qa) or
                             a SQuAD v1.1 / v2.0 JSON file (research.data.squad)
  config.data.validation     a SQuAD file held out; "" = validation_fraction of
                             the task's contexts, by hash
  config.data.seq_len        tokens per window: [CLS] question [SEP] context [SEP]
  config.data.doc_stride     context tokens between the starts of a context's
                             windows (research.data.qa_windows)
  config.data.max_query_len  question tokens kept
  config.decode              max_answer_len (tokens) and no_answer_threshold
                             (SQuAD 2.0) of the answers (research.inference.span_decoding)

The loss is the mean of the start and end positions' cross-entropies over a
window's tokens (padding excluded), as BERT's; a window without the answer
points both at [CLS]. The training loop's evaluations report that loss and
`accuracy` (both ends right) per window; `fusedlm evaluate` and the end of
`fusedlm finetune` then decode every question of the split (the best valid
span across its windows) and report exact match and F1 as the official SQuAD
scripts define them (research.objectives.squad_scores), writing the official
predictions.json (question id -> answer) beside the metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fusedlm.research.data import qa_windows, squad, stdlib_qa
from fusedlm.research.inference import span_decoding
from fusedlm.research.objectives.metrics import row_weights, safe_mean
from fusedlm.research.objectives.objective import Objective, check_seq_len
from fusedlm.research.objectives.squad_scores import squad_scores


def extend_defaults(config):
  """Fine-tuning's defaults made an extractive-QA config's: its schema."""
  d = config.data
  for key in ("text_field", "text_pair_field", "label_field"):
    del d[key]
  d.task = stdlib_qa.NAME  # "stdlib_qa" (built in) or a SQuAD .json file
  d.validation = ""  # a SQuAD file held out; "" = validation_fraction by context hash
  d.validation_fraction = 0.1
  d.seq_len = 128  # window: [CLS] question [SEP] context [SEP]; <= the model's max_len
  d.doc_stride = 32  # context tokens between window starts (BERT: 128 of 384)
  d.max_query_len = 32  # question tokens kept (BERT: 64 of 384)
  config.decode = ml_collections.ConfigDict()
  config.decode.max_answer_len = 30  # tokens of a predicted span (BERT's)
  config.decode.no_answer_threshold = 0.0  # SQuAD 2.0: "" when null - best > this
  return config


def span_loss(
    logits,  # [batch, seq, 2] float32: start, end logits
    batch: dict,  # start_positions, end_positions [B] int; padding_mask [B, T]; weights [B]
):
  """Mean of the start and end cross-entropies over each window's real tokens;
  `correct` counts windows with both ends right."""
  logits = logits.astype(jnp.float32)
  rows = logits.shape[0]
  real = batch["padding_mask"].astype(jnp.bool_)[..., None]
  log_p = jax.nn.log_softmax(jnp.where(real, logits, -1e9), axis=1)  # over positions
  targets = jnp.stack([batch["start_positions"], batch["end_positions"]], -1)  # [B, 2]
  nll = -jnp.take_along_axis(log_p, targets[:, None, :], axis=1)[:, 0]  # [B, 2]
  hit = jnp.all(jnp.argmax(log_p, axis=1) == targets, axis=-1).astype(jnp.float32)
  weights = row_weights(batch, rows)
  used = weights > 0
  sums = {"loss_sum": jnp.sum(jnp.where(used, nll.mean(-1) * weights, 0.0)),
          "correct": jnp.sum(jnp.where(used, hit * weights, 0.0)),
          "count": jnp.sum(weights)}
  return safe_mean(sums["loss_sum"], sums["count"]), sums


def outputs(model, variables, batch: dict, *, deterministic: bool = True, rngs=None):
  """Span logits [B, T, 2] of the windows."""
  return model.apply(
      variables, batch["input_ids"], batch.get("token_type_ids"),
      batch.get("padding_mask"), deterministic=deterministic, rngs=rngs,
      method="span_logits")


def model_config(config, vocab_size, pretrained=None, num_labels: int = 0):
  """The pretrained encoder with a span head and without its pretraining heads, as
  Hugging Face's BertForQuestionAnswering; config.model may change only how it runs."""
  del num_labels
  if pretrained is None:
    raise ValueError("a qa config fine-tunes a pretrained encoder; none given"
                     " (fusedlm finetune --init_from DIR).")
  if pretrained.kind != "encoder":
    raise ValueError(f"extractive QA needs a pretrained encoder (BERT-style); the run is"
                     f" a {pretrained.kind}.")
  if pretrained.vocab_size != vocab_size:
    raise ValueError(f"the tokenizer has {vocab_size} tokens but the pretrained model"
                     f" {pretrained.vocab_size}: the tokenizer is not the pretrained run's.")
  overrides = dict(config.model.to_dict() if hasattr(config.model, "to_dict")
                   else config.model)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  cfg = pretrained.replace(span_head=True, mlm=False, nsp=False, num_labels=0, **overrides)
  check_seq_len(config, cfg, "pretrained model")
  return cfg


def questions_of(data_config) -> tuple[squad.QAData, squad.QAData]:
  """(train, validation) questions of config.data."""
  d = data_config
  if d.task == stdlib_qa.NAME:
    return stdlib_qa.stdlib_qa(d.validation_fraction)
  train = squad.load_squad(d.task)
  if d.validation:
    return train, squad.load_squad(d.validation)
  return squad.split_questions(train, d.validation_fraction)


def _batches(config, data, tokenizer, batch_size: int):
  d = config.data
  return qa_windows.SpanBatches(
      data, tokenizer, d.seq_len, d.doc_stride, d.max_query_len, batch_size,
      config.train.seed, jax.process_index(), jax.process_count())


def train_data(config, tokenizer):
  """The task's train and validation windows, in the pretrained tokenizer."""
  from fusedlm.research.data import run_data  # run_data imports the data layer only; keep it lazy
  if tokenizer is None:
    raise ValueError("a qa run keeps its pretrained model's tokenizer; none was given"
                     " (fusedlm finetune --init_from DIR).")
  train, validation = questions_of(config.data)
  size = config.train.batch_size
  return run_data.RunData(tokenizer, _batches(config, train, tokenizer, size),
                          _batches(config, validation, tokenizer, size), train.name)


def eval_data(config, tokenizer, batch_size: int, data: str | None = None,
              label_names=None):
  """(batch maker, description): the validation split, or a SQuAD file `data`
  ("stdlib_qa": the built-in task's validation split)."""
  del label_names
  if data is None or data == stdlib_qa.NAME:
    d = config.data if data is None else ml_collections.ConfigDict(
        {**config.data.to_dict(), "task": data, "validation": ""})
    _, questions = questions_of(d)
    what = f"{questions.name} validation split"
  else:
    questions, what = squad.load_squad(data), str(data)
  batches = _batches(config, questions, tokenizer, batch_size)
  return batches, qa_windows.describe(batches, what)


def extra_evaluation(run, params, batches: qa_windows.SpanBatches,
                     max_batches: int | None = None) -> dict:
  """Answers every question of the split (those whose windows all lie in the
  first max_batches batches, with max_batches) and scores them; the outputs are
  predictions.json's record and, for SQuAD 2.0 data, null_odds.json's."""
  decode = run.config.decode
  logits = span_decoding.window_logits(run.model_cfg, params, batches, max_batches)
  answers, null_odds = span_decoding.predict_answers(
      batches, logits, max_answer_len=decode.max_answer_len,
      no_answer_threshold=float(decode.no_answer_threshold))
  data = batches.data
  metrics = squad_scores([q for q in data.questions if q.qid in answers], answers,
                         version2=data.version2)
  metrics["decoding"] = (f"best span of at most {decode.max_answer_len} tokens"
                         + (f", no answer when null - best > {decode.no_answer_threshold}"
                            if data.version2 else ""))
  outputs = {"predictions": answers}
  if data.version2:
    outputs["null_odds"] = null_odds
  return {"metrics": metrics, "outputs": outputs}


def trivial_baselines(data: squad.QAData) -> dict[str, dict]:
  """The built-in task's floors: squad_scores of answering nothing, and of the
  card's first field, to every question (research.data.stdlib_qa)."""
  first = {q.qid: stdlib_qa.first_field(q.context) for q in data.questions}
  return {"no_answer": squad_scores(data.questions, {}, version2=data.version2),
          "first_field": squad_scores(data.questions, first, version2=data.version2)}


def _validate(config) -> None:
  d = config.data
  if not d.task:
    raise ValueError("config.data.task is empty: name the SQuAD training file"
                     " (--config.data.task=train-v1.1.json) or the built-in task"
                     f" '{stdlib_qa.NAME}'.")
  if not 0.0 < d.validation_fraction < 1.0:
    raise ValueError("config.data.validation_fraction must be in (0, 1), got"
                     f" {d.validation_fraction}.")
  for key in ("doc_stride", "max_query_len"):
    if d[key] < 1:
      raise ValueError(f"config.data.{key} must be >= 1, got {d[key]}.")
  room = d.seq_len - d.max_query_len - qa_windows.FRAMING
  if not 1 <= d.doc_stride <= room:
    raise ValueError(f"config.data.doc_stride ({d.doc_stride}) must be in [1, {room}]:"
                     f" a window of seq_len {d.seq_len} holds {room} context tokens after a"
                     f" {d.max_query_len}-token question (max_query_len) and"
                     f" {qa_windows.FRAMING} framing tokens.")
  if config.decode.max_answer_len < 1:
    raise ValueError(f"config.decode.max_answer_len must be >= 1, got"
                     f" {config.decode.max_answer_len}.")
  if not isinstance(config.init_step, int) or config.init_step < 0:
    raise ValueError(f"config.init_step must be an int >= 0 (0 = the newest"
                     f" checkpoint), got {config.init_step!r}.")


OBJECTIVE = Objective(
    name="qa",
    fine_tunes=True,
    model_config=model_config,
    outputs=outputs,
    loss=lambda outputs, batch, cfg: span_loss(outputs, batch),
    train_data=train_data,
    eval_data=eval_data,
    validate=_validate,
    report_keys=("loss", "accuracy", "exact_match", "f1", "HasAns_f1", "NoAns_f1"),
    count_unit="windows",
    config_defaults=extend_defaults,
    extra_evaluation=extra_evaluation,
)
