"""One process of a multi-process training run on this machine, for
test_multiprocess.py: joins the run, trains the tiny GPT, exits.

  python -m tests.research.multiprocess_worker PORT NUM_PROCESSES PROCESS_ID \\
      WORKDIR CACHE_DIR STEPS [KEY=VALUE ...]

KEY=VALUE overrides a config field (e.g. data.seq_len=32). The fake-device
count comes from XLA_FLAGS, set by the test.
"""

import ast
import sys


def main(argv):
  port, num_processes, process_id, workdir, cache_dir, steps, *overrides = argv[1:]
  from fusedlm.research.runs import parallel
  parallel.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id),
                      timeout_s=60)
  from fusedlm.research.training import loop
  from tests.research.test_multiprocess import config_for
  config = config_for(cache_dir, int(steps))
  for override in overrides:
    key, value = override.split("=", 1)
    section, field = key.split(".")
    config[section][field] = ast.literal_eval(value)
  try:
    out = loop.train(config, workdir, progress=False)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"start_step {out['start_step']}")


if __name__ == "__main__":
  main(sys.argv)
