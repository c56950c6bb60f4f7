"""The wmdd_jax import graph: every module imports, no module circle, layers stay layered.

The graph is built from the source with ``ast`` (not from ``sys.modules``), so function-level
imports count too: a circle hidden inside a function body still makes the two modules depend on
each other, it only fails later and less predictably.

Nodes are module names; a package is the node of its ``__init__.py`` (``wmdd_jax.data``). An edge
``a -> b`` means running ``a`` may run ``b``. For an import of module ``m`` that is ``m`` and the
packages above it (importing ``wmdd_jax.data.transforms`` runs ``wmdd_jax/data/__init__.py``);
``from p import x`` also points at where ``x`` comes from: the submodule ``p.x`` when there is one,
else the module ``p/__init__.py`` re-exports ``x`` from (so ``from wmdd_jax.data import
open_dataset`` depends on ``wmdd_jax.data.dataset``).

What is left out, and why: edges from a module to the packages that contain it. Python runs a
package's ``__init__`` before any of its submodules, so by the time ``wmdd_jax/data/dataset.py``
says ``from wmdd_jax.data import arrays`` the package is already (being) initialised; keeping
``dataset -> wmdd_jax.data`` would close the harmless loop ``wmdd_jax.data -> dataset ->
wmdd_jax.data`` for every package whose ``__init__`` re-exports its submodules. A real circle is
still reported, because the resolution above looks through the ``__init__``: if ``source.py`` did
``from wmdd_jax.data import open_dataset`` it gets the edge ``source -> dataset``, which with
``dataset -> source`` is a circle between two ordinary modules. Edges from an ``__init__`` to its
own submodules are kept: the ``__init__`` does run them.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
from collections.abc import Iterable

import pytest

import wmdd_jax

PACKAGE = "wmdd_jax"
PACKAGE_DIR = os.path.dirname(os.path.abspath(wmdd_jax.__file__))

# The stages of the method; the device layer (meshes, sharding, units) sits below them.
STAGE_MODULES = (
    "wmdd_jax.train",
    "wmdd_jax.teacher",
    "wmdd_jax.stats",
    "wmdd_jax.statistics",
    "wmdd_jax.synthesis",
    "wmdd_jax.recover",
    "wmdd_jax.relabel",
    "wmdd_jax.evaluate",
    "wmdd_jax.barycenter",
    "wmdd_jax.pipeline",
)
DEVICE_MODULES = ()
DEVICE_PACKAGES = ("wmdd_jax.distributed",)


# ------------------------------------------------------------------------------- the graph


def find_modules(package_dir: str, package: str) -> dict[str, tuple[str, bool]]:
  """Every module of a package, found with pkgutil on disk (nothing is imported).

  Returns:
    module name -> (source file, is a package).
  """
  modules = {package: (os.path.join(package_dir, "__init__.py"), True)}
  for info in pkgutil.iter_modules([package_dir]):
    name = f"{package}.{info.name}"
    if info.ispkg:
      modules.update(find_modules(os.path.join(package_dir, info.name), name))
    else:
      modules[name] = (os.path.join(package_dir, f"{info.name}.py"), False)
  return modules


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  """The absolute module named by ``from <node.module> import ...`` inside ``module``."""
  if not node.level:
    return node.module or ""
  base = module.split(".")
  # In a package's __init__, level 1 is the package itself; in a plain module, its parent.
  base = base[: len(base) - node.level + (1 if is_package else 0)]
  return ".".join(base + ([node.module] if node.module else []))


def _reexports(
    modules: dict[str, tuple[str, bool]], trees: dict[str, ast.Module]
) -> dict[str, dict[str, str]]:
  """package -> {name its __init__ binds with ``from X import name``: X}."""
  table: dict[str, dict[str, str]] = {}
  for name, (_, is_package) in modules.items():
    if not is_package:
      continue
    table[name] = {}
    for node in trees[name].body:
      if isinstance(node, ast.ImportFrom):
        source = _absolute(node, name, True)
        for alias in node.names:
          table[name][alias.asname or alias.name] = source
  return table


def _ancestors(module: str) -> list[str]:
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(package_dir: str, package: str) -> dict[str, set[str]]:
  """The module-level import graph of a package's own modules (see the module docstring).

  Args:
    package_dir: the folder holding the package's ``__init__.py``.
    package: its import name.

  Returns:
    module -> the package modules it imports, top level and inside functions alike.
  """
  modules = find_modules(package_dir, package)
  trees = {}
  for name, (path, _) in modules.items():
    with open(path, encoding="utf-8") as f:
      trees[name] = ast.parse(f.read(), path)
  reexports = _reexports(modules, trees)

  def resolve(package_name: str, attribute: str, seen: frozenset[str] = frozenset()) -> str:
    """The module that ``from package_name import attribute`` takes ``attribute`` from."""
    submodule = f"{package_name}.{attribute}"
    if submodule in modules:
      return submodule
    source = reexports.get(package_name, {}).get(attribute)
    if source is None or source not in modules or source in seen:
      return package_name  # Defined in the __init__ itself (or not ours to follow).
    if source in reexports and source != package_name:
      return resolve(source, attribute, seen | {package_name})
    return source

  graph: dict[str, set[str]] = {}
  for name, (_, is_package) in modules.items():
    targets: set[str] = set()
    for node in ast.walk(trees[name]):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name in modules:
            targets.add(alias.name)
          targets.update(a for a in _ancestors(alias.name) if a in modules)
      elif isinstance(node, ast.ImportFrom):
        source = _absolute(node, name, is_package)
        if source not in modules:
          continue
        targets.add(source)
        targets.update(a for a in _ancestors(source) if a in modules)
        if source in reexports:  # from <package> import x: x's own module too.
          for alias in node.names:
            if alias.name != "*":
              targets.add(resolve(source, alias.name))
    # A module's containing packages are already initialised when it runs (module docstring).
    graph[name] = targets - {name} - set(_ancestors(name))
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``graph`` as [a, b, ..., a], or None when it has none."""
  state: dict[str, int] = {}  # 1: on the current path, 2: finished.
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start)
      if found:
        return found
  return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str | None]:
  """Every module ``start`` imports, directly or not: module -> the module that imports it."""
  parent: dict[str, str | None] = {start: None}
  todo = [start]
  while todo:
    node = todo.pop()
    for nxt in sorted(graph.get(node, ())):
      if nxt not in parent:
        parent[nxt] = node
        todo.append(nxt)
  return parent


def _chain(parent: dict[str, str | None], end: str) -> str:
  chain = [end]
  while parent[chain[-1]] is not None:
    chain.append(parent[chain[-1]])
  return " -> ".join(reversed(chain))


def _is_within(module: str, names: Iterable[str]) -> bool:
  return any(module == n or module.startswith(n + ".") for n in names)


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("module", sorted(find_modules(PACKAGE_DIR, PACKAGE)))
def test_every_module_imports(module):
  importlib.import_module(module)


def test_no_import_cycle():
  graph = import_graph(PACKAGE_DIR, PACKAGE)
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle among wmdd_jax modules: " + " -> ".join(cycle)


def test_device_layer_imports_no_stage():
  graph = import_graph(PACKAGE_DIR, PACKAGE)
  device = [m for m in graph if m in DEVICE_MODULES or _is_within(m, DEVICE_PACKAGES)]
  assert device, f"none of {DEVICE_MODULES} or {DEVICE_PACKAGES} found; update this test."
  offending = []
  for module in sorted(device):
    parent = reachable(graph, module)
    offending += [_chain(parent, m) for m in sorted(parent) if _is_within(m, STAGE_MODULES)]
  assert not offending, "the device layer imports stage modules:\n  " + "\n  ".join(offending)


# ------------------------------------------------------- the checker itself, on toy packages


def _write_package(root, files: dict[str, str]) -> str:
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return str(root / "toy")


def test_checker_sees_function_level_and_reexported_cycles(tmp_path):
  toy = _write_package(
      tmp_path,
      {
          "toy/__init__.py": "from toy.low import helper\n",
          "toy/low.py": "def helper():\n  from toy import high\n  return high\n",
          "toy/high.py": "from toy.low import helper\n",
          "toy/sub/__init__.py": "from toy.sub.a import thing\n",
          "toy/sub/a.py": "from .b import other\nthing = 1\n",
          "toy/sub/b.py": "def other():\n  from toy.sub import thing\n  return thing\n",
      },
  )
  graph = import_graph(toy, "toy")
  assert "toy.high" in graph["toy.low"]  # Function-level `from toy import high`.
  assert "toy.sub.a" in graph["toy.sub.b"]  # `thing` comes from a via sub/__init__.
  assert "toy" not in graph["toy.high"]  # Own package: see the module docstring.
  assert find_cycle({k: graph[k] for k in ("toy.low", "toy.high")}) is not None
  cycle = find_cycle(graph)
  assert cycle is not None and cycle[0] == cycle[-1]


def test_checker_accepts_a_package_that_reexports_its_submodules(tmp_path):
  toy = _write_package(
      tmp_path,
      {
          "toy/__init__.py": "from toy.api import run\nfrom toy.base import Base\n",
          "toy/base.py": "class Base:\n  pass\n",
          "toy/impl.py": "from toy.base import Base\n",
          "toy/api.py": "from toy import impl\nfrom toy.base import Base\ndef run():\n  pass\n",
      },
  )
  graph = import_graph(toy, "toy")
  assert graph["toy"] == {"toy.api", "toy.base"}
  assert graph["toy.api"] == {"toy.impl", "toy.base"}
  assert find_cycle(graph) is None


# ------------------------------------------------ stages see the execution layer's interface only

STAGE_FILES = ("teacher", "training", "statistics", "barycenter", "recover", "relabel",
               "evaluate")


@pytest.mark.parametrize("stage", STAGE_FILES)
def test_stages_use_only_the_execution_interface(stage):
  """A stage module imports ``wmdd_jax.distributed`` (its public names) and nothing under it, and
  never passes a mesh or units itself: how it runs on devices is its execution's business."""
  path = os.path.join(PACKAGE_DIR, f"{stage}.py")
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  bad = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      if node.module.startswith("wmdd_jax.distributed."):
        bad.append(f"line {node.lineno}: from {node.module} import ...")
      if node.module == "wmdd_jax" and {a.name for a in node.names} & {"parallel", "units"}:
        bad.append(f"line {node.lineno}: {names}")
    elif isinstance(node, ast.Import):
      bad += [f"line {node.lineno}: import {a.name}" for a in node.names
              if a.name.startswith("wmdd_jax.distributed.")]
    elif isinstance(node, ast.keyword) and node.arg in ("mesh", "units", "devices"):
      bad.append(f"line {node.value.lineno}: keyword {node.arg}=")
    elif isinstance(node, ast.arg) and node.arg in ("mesh", "units", "devices"):
      bad.append(f"line {node.lineno}: parameter {node.arg}")
  assert not bad, f"wmdd_jax/{stage}.py reaches past the execution interface:\n  " + "\n  ".join(
      bad)
