"""`fusedlm <command> ...` in a subprocess, started outside the checkout as a user
starts it (the console script is `fusedlm.research.cli:main`): the repository
root is not on sys.path there, so a module that resolves only from the
checkout, or a top-level `kernels` of ours shadowing Hugging Face's, fails."""

import subprocess
import sys
import tempfile


def fusedlm(*args, cwd=None, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "fusedlm.research.cli", *map(str, args)],
                        cwd=cwd or tempfile.gettempdir(), capture_output=True, text=True,
                        timeout=timeout, env=env)
