"""The package's layout, as docs/design.md states it: layers that import only downwards,
no import circle between modules (lazy imports inside functions included), empty package
`__init__`s, no module over 600 lines, and no study function over 80."""

import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["common", "configs", "data", "models", "teacher", "distill", "trainer", "agent",
          "experiment", "cli"]


def _modules() -> dict[str, ast.Module]:
  out = {}
  for path in glob.glob(os.path.join(REPO, "sad_jax", "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    out[rel.removesuffix(".__init__")] = ast.parse(open(path, encoding="utf-8").read())
  return out


def _imports(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
  """module → the sad_jax modules it imports anywhere in its body."""
  out = {}
  for name, tree in mods.items():
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sad_jax"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          deps.add(full if full in mods else node.module)
      elif isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.startswith("sad_jax")}
    out[name] = {d for d in deps if d in mods and d != name}
  return out


def _layer(module: str) -> int:
  return LAYERS.index(module.split(".")[1]) if module.count(".") else -1


def test_no_import_circle_between_modules():
  graph = _imports(_modules())
  state: dict[str, int] = {}

  def visit(node, path):
    state[node] = 1
    for dep in sorted(graph[node]):
      assert state.get(dep) != 1, "import circle: " + " → ".join([*path, node, dep])
      if dep not in state:
        visit(dep, [*path, node])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [])


def test_packages_import_only_their_own_layer_or_below():
  upward = [f"{m} → {d}" for m, deps in _imports(_modules()).items() for d in deps
            if m != "sad_jax" and d != "sad_jax" and _layer(d) > _layer(m)]
  assert not upward, upward


def test_package_inits_import_nothing_and_modules_stay_small():
  for name, tree in _modules().items():
    path = os.path.join(REPO, *name.split(".")) + (
        "/__init__.py" if os.path.isdir(os.path.join(REPO, *name.split("."))) else ".py")
    if path.endswith("__init__.py"):
      assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], name
    assert len(open(path, encoding="utf-8").read().splitlines()) <= 600, name
    if ".experiment.study." in name + ".":
      for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
          assert node.end_lineno - node.lineno + 1 <= 80, f"{name}.{node.name}"
