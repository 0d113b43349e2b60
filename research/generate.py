"""Generates text from a trained decoder's checkpoint.

  fusedlm generate --workdir /tmp/tiny_gpt --prompt "Once upon a time"
  fusedlm generate --workdir /tmp/tiny_gpt --prompt "def " --prompt "" \\
      --max_new_tokens 32 --temperature 0.8 --top_k 40 --top_p 0.95 --seed 1 \\
      --step 2000 --output samples.json

Each --prompt is continued (an empty one starts from end-of-text) with the
run's own tokenizer and model, all prompts in one batch, until end-of-text or
--max_new_tokens. Temperature 0 (the default) is greedy decoding; otherwise
tokens are drawn after top-k and top-p filtering, reproducibly for a --seed.
--step picks a checkpoint (default: the newest). --output writes a JSON record
of the settings and, per prompt, the continuation's text and token ids. The
output first names the attention implementation each layer resolved to, for
the prompts and for each cached decoding step (research.models.resolved_attention).

A bad workdir, step or setting ends with exit status 2 and one line on stderr
(a missing --workdir or --prompt is absl's flag error, status 1).
"""

from __future__ import annotations

from absl import flags

from fusedlm.research.inference.generation import (
  check_request,
  default_pad_id,
  encode_prompts,
  generate,
)
from fusedlm.research.inference.sampling import Sampling
from fusedlm.research.models import resolved_attention
from fusedlm.research.runs import command_line, saved_run


def run_generation(workdir, prompts: list[str], *, max_new_tokens: int,
                   sampling: Sampling, seed: int, step: int | None = None) -> dict:
  """The JSON record the CLI writes: settings plus one entry per prompt."""
  run = saved_run.open_run(workdir)
  tokenizer = run.tokenizer
  prompt_ids = encode_prompts(tokenizer, prompts)
  request = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                 eos_id=tokenizer.eos_id, pad_id=default_pad_id(tokenizer))
  # Before the checkpoint is read: a bad step or setting should not cost a restore.
  step = run.resolve_step(step)
  check_request(run.model_cfg, prompt_ids, **request)
  step, params = run.restore_params(step)
  tokens = generate(run.model_cfg, params, prompt_ids, **request)
  longest = max(max(len(ids) for ids in prompt_ids), 1)  # an empty prompt starts at eos
  attention = resolved_attention.for_generation(
      run.model_cfg, batch=len(prompt_ids), prompt_len=longest,
      cache_len=longest + max_new_tokens)
  eos = tokenizer.eos_id
  return {
      "workdir": str(run.workdir),
      "step": step,
      "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k,
                   "top_p": sampling.top_p},
      "seed": seed,
      "max_new_tokens": max_new_tokens,
      "eos_id": eos,
      "attention": resolved_attention.describe(attention, run.model_cfg),
      "samples": [{
          "prompt": text,
          "prompt_ids": ids.tolist(),
          "continuation": tokenizer.decode(new, skip_special_tokens=True),
          "token_ids": new.tolist(),
          "stopped_at_eos": eos is not None and int(new[-1]) == eos,
      } for text, ids, new in zip(prompts, prompt_ids, tokens)],
  }


def define_flags(fv: flags.FlagValues) -> None:
  f = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "run folder written by fusedlm train", **f)
  flags.DEFINE_multi_string("prompt", None, "text to continue; repeat for a batch"
                            " (\"\" starts from end-of-text)", **f)
  flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per prompt at most", **f)
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sample from softmax(logits/T)", **f)
  flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = off)", **f)
  flags.DEFINE_float("top_p", 1.0, "sample from the nucleus of this probability (1 = off)", **f)
  flags.DEFINE_integer("seed", 0, "random seed of the sampling", **f)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", **f)
  flags.DEFINE_string("output", None, "JSON file for the prompts, continuations and ids", **f)
  flags.mark_flags_as_required(["workdir", "prompt"], flag_values=fv)


def _main(f: flags.FlagValues) -> None:
  sampling = Sampling(f.temperature, f.top_k, f.top_p)
  record = run_generation(
      f.workdir, f.prompt, max_new_tokens=f.max_new_tokens,
      sampling=sampling, seed=f.seed, step=f.step)
  print(f"step {record['step']} of {record['workdir']}, {sampling.describe()},"
        f" seed {record['seed']}")
  print("\n".join(record["attention"]))
  for i, sample in enumerate(record["samples"]):
    end = " [end of text]" if sample["stopped_at_eos"] else ""
    print(f"\n--- prompt {i}: {sample['prompt']!r}{end}")
    print(sample["prompt"] + sample["continuation"])
  if f.output:
    print(f"\nwrote {command_line.write_json(record, f.output)}")


def main(argv=None) -> None:
  command_line.run("fusedlm generate", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
