"""fusedlm installs as one namespace and one command, beside Hugging Face's `kernels`.

transformers >= 5.25 needs Hugging Face's package named `kernels`; ours is
`fusedlm.kernels`. These tests run what a user runs, from a folder outside
the checkout (where the repository root is not on sys.path), which the rest
of the suite, run from the checkout, cannot see.
"""

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.commands import fusedlm

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = {"kernels": "fusedlm.kernels", "research": "fusedlm.research"}


def test_every_package_folder_is_installed_under_fusedlm():
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  assert config["package-dir"] == {package: folder for folder, package in TOP_FOLDERS.items()}
  on_disk = set()
  for folder, package in TOP_FOLDERS.items():
    for init in (ROOT / folder).rglob("__init__.py"):
      parts = init.parent.relative_to(ROOT / folder).parts
      on_disk.add(".".join((package, *parts)))
  assert set(config["packages"]) == on_disk, (
      "pyproject.toml's [tool.setuptools] packages must list every package folder")
  assert not any(name.split(".")[0] in ("kernels", "research") for name in config["packages"])


def test_the_library_resolves_to_this_checkout():
  for package, folder in (("fusedlm.kernels", "kernels"), ("fusedlm.research", "research")):
    spec = importlib.util.find_spec(package)
    assert Path(spec.origin).resolve() == ROOT / folder / "__init__.py"


def test_beside_hugging_face_kernels_from_another_folder(tmp_path):
  code = ("import fusedlm.kernels, kernels, transformers, fusedlm.research.train;"
          "print(fusedlm.kernels.__file__); print(kernels.__file__)")
  done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  ours, theirs = done.stdout.split()
  assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
  assert Path(theirs).resolve() != ROOT / "kernels" / "__init__.py"
  assert "site-packages" in Path(theirs).parts, "Hugging Face's kernels, not ours"


def test_fusedlm_train_runs_from_another_folder(tmp_path):
  work = tmp_path / "elsewhere"
  work.mkdir()
  done = fusedlm("train", "--config", ROOT / "experiments" / "tiny_gpt.py:runlocal",
                 "--workdir", "run", "--config.train.steps=4",
                 f"--config.data.cache_dir={tmp_path / 'cache'}", cwd=work)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (work / "run" / "checkpoints" / "4").is_dir()
  assert "final eval" in done.stdout


def test_help_lists_every_command_and_a_typo_is_one_line():
  from fusedlm.research import cli
  done = fusedlm("--help", timeout=120)
  assert done.returncode == 0
  for name in [*cli.COMMANDS, "inspect"]:
    assert f"  {name} " in done.stdout
  typo = fusedlm("trian", timeout=120)
  assert typo.returncode == 2
  assert typo.stderr.splitlines()[0] == "fusedlm: error: unknown command 'trian'."
  for name, command in [*cli.COMMANDS.items(), *cli.INSPECT.items()]:
    assert hasattr(importlib.import_module(command.module), "main"), name


def test_a_command_also_runs_as_a_module(tmp_path):
  done = subprocess.run([sys.executable, "-m", "fusedlm.research.evaluate", "--workdir",
                         tmp_path / "none"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 2
  assert done.stderr.startswith("fusedlm evaluate: error:"), done.stderr
