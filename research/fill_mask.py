"""fusedlm fill-mask: a masked-LM encoder's most likely tokens for each [MASK] in a text.

  fusedlm fill-mask --workdir runs/tiny_bert --text "The [MASK] sat on the mat."
  fusedlm fill-mask --workdir DIR --text "a [MASK] b" --text "[MASK] c" \\
      --top_k 10 --step 200 --output /tmp/fill.json

Prints a table per mask (rank, probability, id, token, the filled text) and,
with --output, writes the predictions as JSON. How texts are framed and what
the probabilities are: research.inference.masked_lm.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from fusedlm.research.inference.masked_lm import Prediction, clip, fill_mask
from fusedlm.research.runs import command_line, saved_run


def format_table(texts: Sequence[str], results: list[list[list[Prediction]]]) -> str:
  """A readable table per mask: rank, probability, id, token, filled text."""
  lines = []
  for text, per_mask in zip(texts, results):
    for index, predictions in enumerate(per_mask):
      lines.append(f"{clip(text)}  mask {index + 1} of {len(per_mask)}")
      lines.append(f"  {'rank':>4}  {'prob':>7}  {'id':>6}  {'token':<12}  filled text")
      for rank, p in enumerate(predictions, 1):
        lines.append(f"  {rank:>4}  {p.probability:>7.2%}  {p.token_id:>6}"
                     f"  {p.token!r:<12}  {clip(p.filled_text)}")
      lines.append("")
  return "\n".join(lines)


def to_json(workdir, step: int, top_k: int, texts: Sequence[str],
            results: list[list[list[Prediction]]]) -> dict:
  """The --output record: per text, per mask, the predictions as dicts."""
  return {
      "workdir": str(workdir), "step": step, "top_k": top_k,
      "results": [{"text": text,
                   "masks": [[p.to_dict() for p in predictions] for predictions in per_mask]}
                  for text, per_mask in zip(texts, results)],
  }



def define_flags(fv: flags.FlagValues) -> None:
  f = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "run folder written by fusedlm train", required=True,
                      **f)
  flags.DEFINE_multi_string("text", None, "text with one or more [MASK] (repeatable)",
                            required=True, **f)
  flags.DEFINE_integer("top_k", 5, "predictions per mask", **f)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", **f)
  flags.DEFINE_string("output", None, "also write the predictions to this JSON file", **f)


def _main(f: flags.FlagValues) -> None:
  run = saved_run.open_run(f.workdir)
  step, params = run.restore_params(f.step)
  results = fill_mask(run, params, f.text, f.top_k)
  print(f"{run.workdir} at step {step}\n")
  print(format_table(f.text, results))
  if f.output:
    record = to_json(run.workdir, step, f.top_k, f.text, results)
    print(f"wrote {command_line.write_json(record, f.output)}")


def main(argv=None) -> None:
  command_line.run("fusedlm fill-mask", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
