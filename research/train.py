"""fusedlm train: trains an experiment config into a workdir, and resumes there.

  fusedlm train --config experiments/tiny_gpt.py --workdir runs/tiny_gpt
  fusedlm train --config experiments/tiny_gpt.py --workdir /tmp/t --config.train.steps=200
  fusedlm train --config experiments/gpt2_small.py:runlocal --workdir /tmp/smoke

Rerunning with the same --workdir resumes from the newest intact checkpoint
and replays exactly (research.training.loop); a resume that would change the
batches is refused unless --allow_data_change. Multi-process runs take
--coordinator / --num_processes / --process_id (or --distributed).
"""

from __future__ import annotations

from absl import flags

from fusedlm.research.runs import command_line
from fusedlm.research.training import loop
from fusedlm.research.training.eval_loop import format_summary


def define_flags(fv: flags.FlagValues) -> None:
  command_line.define_config_flag(fv, "experiment config file (path.py or path.py:runlocal)")
  flags.DEFINE_string("workdir", None, "checkpoints, logs, config.json, tokenizer",
                      flag_values=fv, required=True)
  flags.DEFINE_bool("allow_data_change", False, "resume even though fields that decide"
                    " the batches (batch_size, seq_len, corpus, tokenizer, ...) changed",
                    flag_values=fv)
  command_line.define_distributed_flags(fv)


def _main(f: flags.FlagValues) -> None:
  command_line.start_distributed(f)
  result = loop.train(f.config, f.workdir, allow_data_change=f.allow_data_change)
  when = (f"step {result['step']}, from the run's log: it was already complete"
          if result["already_complete"] else f"step {result['step']}")
  print(f"final eval ({when}): {format_summary(result['eval'], result['objective'])}")


def main(argv=None) -> None:
  command_line.run("fusedlm train", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
