"""Makes a fusedlm run folder from a local Hugging Face BERT or GPT-2 model folder.

  fusedlm import-hf --hf /models/bert-base-uncased --workdir runs/bert_hf
  fusedlm evaluate --workdir runs/bert_hf --data notes.txt
  fusedlm fill-mask --workdir runs/bert_hf --text "paris is the [MASK] of france."
  fusedlm finetune --config experiments/finetune_topics.py \\
      --init_from runs/bert_hf --workdir runs/topics_from_bert

The folder needs config.json, the weights (model.safetensors, a sharded
index, or pytorch_model.bin) and the tokenizer (tokenizer.json, or a BERT
vocab.txt); nothing is downloaded. The run it writes is like one fusedlm train
wrote: config.json (objective "mlm" for BERT, with NSP when the model has that
head, "causal" for GPT-2; the model fields are the imported model's, so
fusedlm train on the folder continues pretraining from it), the tokenizer,
and a checkpoint at step 0 holding the parameters and a fresh AdamW state.
An existing run is never overwritten.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from fusedlm.research import run_config
from fusedlm.research.data import load_tokenizer
from fusedlm.research.models.hf_import import load_hf_checkpoint
from fusedlm.research.runs import checkpoint, command_line, run_files, saved_run
from fusedlm.research.training import optimizer, steps

SEQ_LEN = 128  # config.data.seq_len of the run (at most the model's max_len)


def import_hf(hf_dir, workdir, *, seed: int = 0, **runtime_overrides) -> saved_run.SavedRun:
  """Writes the run folder and returns it, reopened.

  runtime_overrides: ModelConfig fields that do not change the parameters
  (dtype, attention, remat, dropout), e.g. dtype="float32" on a CPU.

  Raises:
    FileNotFoundError: no tokenizer in hf_dir.
    ValueError: an existing run in workdir, an unsupported model, or a
      tokenizer whose size differs from the model's embedding.
  """
  hf_dir, workdir = Path(hf_dir), Path(workdir)
  if (workdir / run_files.CONFIG_FILE).exists() or (workdir / checkpoint.CHECKPOINT_DIR).exists():
    raise ValueError(f"{workdir} already holds a run; import into a new --workdir.")
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"no Hugging Face model folder at {hf_dir}")
  tokenizer = load_tokenizer(hf_dir)
  model_cfg, params = load_hf_checkpoint(hf_dir, **runtime_overrides)
  if tokenizer.vocab_size != model_cfg.vocab_size:
    raise ValueError(f"the tokenizer in {hf_dir} has {tokenizer.vocab_size} tokens but the"
                     f" model's embedding {model_cfg.vocab_size} rows; they must match.")
  config = _run_config(model_cfg, tokenizer.kind, seed)
  # The run's own rebuild of the model must be the imported one, or a resume
  # (fusedlm train on this folder) would be refused.
  rebuilt = run_config.build_model_config(config, tokenizer.vocab_size)
  if rebuilt != model_cfg:
    raise ValueError("the run config does not rebuild the imported model: " + "; ".join(
        run_config.diff_model(model_cfg.to_dict(), rebuilt.to_dict())))
  tx = optimizer.build_optimizer(config.optimizer, config.train.steps)
  state = steps.create(model_cfg, tx, seed, params=params)
  run_files.write_run_files(workdir, config, tokenizer, model_cfg.to_dict())
  saver = checkpoint.Checkpointer(workdir, config.checkpoint.every, config.checkpoint.keep,
                                  use_async=False)
  try:
    saver.save(0, state, force=True)
  finally:
    saver.close()
  return saved_run.open_run(workdir)


def _run_config(model_cfg, tokenizer_kind: str, seed: int):
  config = run_config.defaults()
  for field, value in model_cfg.to_dict().items():
    if field in config.model:
      config.model[field] = value
  config.objective = "mlm" if model_cfg.kind == "encoder" else "causal"
  config.nsp = bool(model_cfg.nsp)
  config.data.tokenizer = tokenizer_kind
  config.data.vocab_size = model_cfg.vocab_size
  config.data.seq_len = min(SEQ_LEN, model_cfg.max_len)
  config.train.seed = seed
  run_config.validate(config)
  return config


def define_flags(fv: flags.FlagValues) -> None:
  f = dict(flag_values=fv)
  flags.DEFINE_string("hf", None, "local Hugging Face model folder (BERT or GPT-2)", **f)
  flags.DEFINE_string("workdir", None, "the new run folder", **f)
  flags.DEFINE_string("dtype", None, "compute dtype (default: the model config's)", **f)
  flags.DEFINE_string("attention", None, "attention implementation (default: auto)", **f)
  flags.mark_flags_as_required(["hf", "workdir"], flag_values=fv)


def _main(f: flags.FlagValues) -> None:
  overrides = {k: v for k, v in (("dtype", f.dtype), ("attention", f.attention))
               if v is not None}
  run = import_hf(f.hf, f.workdir, **overrides)
  cfg = run.model_cfg
  print(f"imported {Path(f.hf).absolute()} as a {cfg.kind} ({cfg.num_layers} layers,"
        f" width {cfg.hidden_size}, vocabulary {cfg.vocab_size}, objective"
        f" {run.objective}) into {run.workdir}, checkpoint step {run.steps[-1]}")


def main(argv=None) -> None:
  command_line.run("fusedlm import-hf", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
