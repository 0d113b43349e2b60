"""The layout shows the architecture: what the folders promise, checked on the source.

* No import cycle among fusedlm's modules, counting every import: those
  inside functions and under TYPE_CHECKING too (a module importing its own
  package is no cycle: Python initialises the package first anyway).
* research/'s top level holds only the commands (modules with a `main`) and
  run_config; no command imports another command.
* kernels/ imports nothing of research/.
* Every package's __init__ has a docstring saying what lives there.
* No module is named after a standard-library module, and none is far past
  ~500 lines.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kernels": "fusedlm.kernels", "research": "fusedlm.research"}
MAX_LINES = 520  # "about 500": a module past it has two concerns
RESEARCH_LIBRARY_AT_TOP = {"run_config", "cli"}  # the config schema; the dispatcher


def _modules() -> dict[str, Path]:
  found = {}
  for folder, package in FOLDERS.items():
    for path in (ROOT / folder).rglob("*.py"):
      parts = path.relative_to(ROOT / folder).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      found[".".join((package, *parts))] = path
  return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
  """Every fusedlm module `name` imports, anywhere in its file."""
  is_package = path.name == "__init__.py"
  package = name if is_package else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
    for target in targets:
      while target and target not in MODULES:
        target = target.rpartition(".")[0]
      if target and target != name:
        found.add(target)
  return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(GRAPH[node]):
      if node.startswith(nxt + "."):
        continue  # a module importing its own package: Python initialises parents first
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(GRAPH):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  cycle = _cycle()
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_function_local_imports(monkeypatch):
  # A planted cycle through a function-local import is found.
  monkeypatch.setitem(GRAPH, "fusedlm.kernels.masking",
                      GRAPH["fusedlm.kernels.masking"] | {"fusedlm.kernels.attention"})
  assert "fusedlm.kernels.masking" in GRAPH["fusedlm.kernels.cudnn"]
  assert _cycle() is not None


def _commands() -> set[str]:
  tops = {name for name, path in MODULES.items()
          if name.count(".") == 2 and name.startswith("fusedlm.research.")
          and path.name != "__init__.py"}
  return {name for name in tops if name.rpartition(".")[2] not in RESEARCH_LIBRARY_AT_TOP}


def test_research_top_level_holds_only_commands_and_run_config():
  for name in _commands():
    tree = ast.parse(MODULES[name].read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "main" in functions, f"{name} is at research/'s top level but is no command"


def test_no_command_imports_another():
  commands = _commands()
  for name in commands:
    assert not GRAPH[name] & (commands - {name}), f"{name} imports {GRAPH[name] & commands}"
    assert "fusedlm.research.cli" not in GRAPH[name]


def test_kernels_know_nothing_of_research():
  for name, imported in GRAPH.items():
    if name.startswith("fusedlm.kernels"):
      assert not [m for m in imported if m.startswith("fusedlm.research")], name


@pytest.mark.parametrize("name", sorted(n for n, p in MODULES.items() if p.name == "__init__.py"))
def test_every_package_says_what_lives_there(name):
  docstring = ast.get_docstring(ast.parse(MODULES[name].read_text()))
  assert docstring and len(docstring.split()) >= 8, f"{name}'s __init__ needs a docstring"


def test_no_module_shadows_the_standard_library_or_grows_past_500_lines():
  for name, path in MODULES.items():
    assert name.rpartition(".")[2] not in sys.stdlib_module_names, name
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"
