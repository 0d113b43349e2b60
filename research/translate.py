"""Translates (or summarizes) text with a trained encoder-decoder run.

  fusedlm translate --workdir runs/tiny_seq2seq --text "mo tibu zeti pibi luza tedu"
  fusedlm translate --workdir runs/en_es --input news.en --output news.es \\
      --reference news.es.ref --beam_size 5 --length_penalty 1.0
  fusedlm translate --workdir runs/stdlib_summaries --input bodies.txt \\
      --reference summaries.txt --min_new_tokens 4 --no_repeat_ngram_size 3

Every --text (or every line of --input) is translated with the run's own
tokenizer and model, in batches of --batch_size, jitted, with the decoder's
key/value cache and the source's keys/values computed once. Decoding is the
run's config.decode (beam size, length penalty, minimum and maximum length,
no-repeat n-gram size) unless the flags of the same names say otherwise;
--beam_size 0 is greedy, and --temperature > 0 samples (with --top_k /
--top_p and a --seed) instead. --output writes the translations one a line;
--reference (one a line, aligned with the input) adds the run's scores:
sacrebleu's BLEU and chrF for translation, ROUGE-1/2/L for a summarization
run; --json writes a record of settings, texts, translations,
log-probabilities and scores.

A bad workdir, step, file or setting ends with exit status 2 and one line on
stderr.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from fusedlm.research import objectives
from fusedlm.research.inference import seq2seq_decoding
from fusedlm.research.inference.sampling import Sampling
from fusedlm.research.objectives import seq2seq
from fusedlm.research.runs import command_line, saved_run

# How the scores of research.objectives' text_scores are printed.
SCORE_NAMES = {"bleu": "BLEU", "chrf": "chrF", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2",
               "rougeL": "ROUGE-L"}


def read_lines(path) -> list[str]:
  """The lines of a text file, without their newlines; FileNotFoundError if none."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such file: {path}")
  return path.read_text(encoding="utf-8").splitlines()


def run_translation(workdir, texts: list[str], *, step: int | None = None,
                    beam_size: int | None = None, length_penalty: float | None = None,
                    max_new_tokens: int | None = None, min_new_tokens: int | None = None,
                    no_repeat_ngram_size: int | None = None, sampling: Sampling = Sampling(),
                    seed: int = 0, batch_size: int = 64,
                    references: list[str] | None = None) -> dict:
  """The record the CLI prints and writes: settings, translations, scores.

  beam_size / length_penalty / min_new_tokens / no_repeat_ngram_size None
  take the run's config.decode; beam_size 0 is greedy; a sampling temperature
  > 0 samples instead of searching.
  """
  run = saved_run.open_run(workdir)
  if run.model_cfg.kind != "encoder_decoder":
    raise ValueError(f"{workdir} is a {run.model_cfg.kind} run; fusedlm translate needs"
                     " an encoder-decoder (seq2seq) run (fusedlm generate continues text).")
  if not texts:
    raise ValueError("nothing to translate: give --text or a non-empty --input.")
  if references is not None and len(references) != len(texts):
    raise ValueError(f"{len(references)} references for {len(texts)} texts; give one"
                     " reference line per input line.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  settings = seq2seq.decode_settings(run.config)
  if beam_size is not None:
    settings["beam_size"] = beam_size or None
  if length_penalty is not None:
    settings["length_penalty"] = length_penalty
  if max_new_tokens:
    settings["max_new_tokens"] = max_new_tokens
  if min_new_tokens is not None:
    settings["min_new_tokens"] = min_new_tokens
  if no_repeat_ngram_size is not None:
    settings["no_repeat_ngram_size"] = no_repeat_ngram_size
  if not sampling.greedy:
    settings.update(beam_size=None, length_penalty=0.0)
  if settings["beam_size"] is None:
    settings["length_penalty"] = 0.0
  step = run.resolve_step(step)
  step, params = run.restore_params(step)
  translations, scores = seq2seq_decoding.translate_texts(
      run, params, texts, batch_size=batch_size, sampling=sampling, seed=seed, **settings)
  record = {
      "workdir": str(run.workdir), "step": step,
      "decoding": {"beam_size": settings["beam_size"] or 0,
                   "length_penalty": settings["length_penalty"],
                   "max_new_tokens": settings["max_new_tokens"] or run.model_cfg.max_len,
                   "min_new_tokens": settings["min_new_tokens"],
                   "no_repeat_ngram_size": settings["no_repeat_ngram_size"],
                   "sampling": sampling.describe(), "seed": seed},
      "translations": [{"source": s, "translation": t, "log_prob": float(p)}
                       for s, t, p in zip(texts, translations, scores)],
  }
  if references is not None:
    score = objectives.get(run.objective).text_scores or seq2seq.corpus_scores
    record["scores"] = score(translations, [[r] for r in references])
  return record


def define_flags(fv: flags.FlagValues) -> None:
  f = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "seq2seq run folder written by fusedlm train", **f)
  flags.DEFINE_multi_string("text", None, "a text to translate; repeat for a batch", **f)
  flags.DEFINE_string("input", None, "a file of texts to translate, one a line", **f)
  flags.DEFINE_string("output", None, "write the translations here, one a line", **f)
  flags.DEFINE_string("reference", None, "references, one a line: BLEU and chrF (ROUGE for"
                      " a summarization run)", **f)
  flags.DEFINE_string("json", None, "JSON record of settings, translations and scores", **f)
  flags.DEFINE_integer("beam_size", None, "beam search width; 0 = greedy"
                       " (default: the run's config.decode.beam_size)", **f)
  flags.DEFINE_float("length_penalty", None, "GNMT length penalty alpha"
                     " (default: the run's config.decode.length_penalty)", **f)
  flags.DEFINE_integer("max_new_tokens", 0, "longest translation in tokens (0 = max_len)", **f)
  flags.DEFINE_integer("min_new_tokens", None, "no end-of-text before this many tokens"
                       " (default: the run's config.decode)", **f)
  flags.DEFINE_integer("no_repeat_ngram_size", None, "no n-gram of this size twice in a"
                       " translation; 0 = off (default: the run's config.decode)", **f)
  flags.DEFINE_float("temperature", 0.0, "> 0: sample instead of searching", **f)
  flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = off)", **f)
  flags.DEFINE_float("top_p", 1.0, "sample from the nucleus of this probability (1 = off)", **f)
  flags.DEFINE_integer("seed", 0, "random seed of the sampling", **f)
  flags.DEFINE_integer("batch_size", 64, "sentences decoded together", **f)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", **f)
  flags.mark_flags_as_required(["workdir"], flag_values=fv)


def _main(f: flags.FlagValues) -> None:
  if bool(f.text) == bool(f.input):
    raise ValueError("give either --text (repeatable) or --input FILE.")
  texts = list(f.text) if f.text else read_lines(f.input)
  references = read_lines(f.reference) if f.reference else None
  record = run_translation(
      f.workdir, texts, step=f.step, beam_size=f.beam_size,
      length_penalty=f.length_penalty, max_new_tokens=f.max_new_tokens,
      min_new_tokens=f.min_new_tokens, no_repeat_ngram_size=f.no_repeat_ngram_size,
      sampling=Sampling(f.temperature, f.top_k, f.top_p), seed=f.seed,
      batch_size=f.batch_size, references=references)
  d = record["decoding"]
  how = (f"beam {d['beam_size']}, length penalty {d['length_penalty']:g}"
         if d["beam_size"] else d["sampling"])
  lines = [item["translation"] for item in record["translations"]]
  if f.output:
    command_line.write_lines(lines, f.output)
    print(f"step {record['step']} of {record['workdir']}, {how}: {len(lines)}"
          f" translations written to {f.output}")
  else:
    print(f"step {record['step']} of {record['workdir']}, {how}")
    for item in record["translations"]:
      print(f"\n{item['source']}\n-> {item['translation']}")
  if "scores" in record:
    s = record["scores"]
    signature = s.get("bleu_signature") or s.get("rouge_signature", "")
    print("  ".join(f"{label} {s[key]:.2f}" for key, label in SCORE_NAMES.items()
                    if key in s) + f"  ({signature})")
  if f.json:
    print(f"wrote {command_line.write_json(record, f.json)}")


def main(argv=None) -> None:
  command_line.run("fusedlm translate", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
