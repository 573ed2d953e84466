"""The packages' import graph, built from the sources: no module imports itself through others.

Every ``import`` and ``from ... import`` of ``df2_jax`` and ``data_pipeline`` counts, at module
level or inside a function, so that a function-local import cannot hide a cycle. A package's
``__init__.py`` is a node like any module (importing ``pkg.mod`` runs ``pkg/__init__.py``).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("df2_jax", "data_pipeline")


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
  """The module of ours that importing ``name`` runs last (the longest known prefix)."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in modules:
      return candidate
  return None


def import_graph() -> dict[str, set[str]]:
  """{module: the modules of ours it imports}, from every import statement of its source."""
  modules = _modules()
  graph: dict[str, set[str]] = {m: set() for m in modules}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
      for target in targets:
        found = _resolve(target, modules)
        if found is not None and found != name:
          graph[name].add(found)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_graph_sees_module_and_function_level_imports():
  graph = import_graph()
  assert "df2_jax.models.match_rcnn" in graph["df2_jax.inference"]  # module level
  assert "data_pipeline.pipeline" in graph["df2_jax.train"]  # inside a function
  assert "df2_jax.masks" in graph["df2_jax.postprocess"]


def test_a_cycle_is_found():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_packages():
  found = cycles(import_graph())
  assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
