"""The package's layout: a wing per concern, and imports that only point down.

Reads every module's imports (top-level and inside functions) from its source with `ast`, so a lazy
import cannot hide a dependency. The rules are the README's "Layout" table:
  moe/      jax and flax only: nothing of a model family or of the runtime;
  models/   may use moe/, never the runtime (serving/), the built-in model or the evaluations;
  serving/  may use moe/, models/ and checkpoint, never builtin/ or eval/;
  builtin/  anything but eval/ and the command-line tools.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "swapmoe_jax")

# wing -> the wings of this package it may import (besides itself)
ALLOWED = {
    "moe": set(),
    "models": {"moe"},
    "serving": {"moe", "models", "checkpoint"},
    "builtin": {"moe", "models", "serving", "checkpoint"},
    "eval": {"moe", "models", "serving", "checkpoint", "builtin"},
}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(ROOT))[:-len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def package_imports(root: str = ROOT) -> dict[str, set[str]]:
  """{module: the swapmoe_jax modules it imports}, for every module under `root`."""
  graph = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      module = _module_name(path)
      targets = set()
      for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
          targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
          # `from a.b import c`: the module a.b.c where there is one, else the names of a.b
          targets |= {(node.module, a.name) for a in node.names}
      graph[module] = targets
  modules = set(graph)
  resolved = {}
  for module, targets in graph.items():
    out = set()
    for t in targets:
      if isinstance(t, tuple):
        t = f"{t[0]}.{t[1]}" if f"{t[0]}.{t[1]}" in modules else t[0]
      if t in modules and t != module:
        out.add(t)
    resolved[module] = out
  return resolved


def wing(module: str) -> str:
  """swapmoe_jax.serving.loader -> 'serving'; top-level modules are their own name."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
  out = []
  for module, targets in sorted(graph.items()):
    w = wing(module)
    if w not in ALLOWED:
      continue
    for t in sorted(targets):
      tw = wing(t)
      if tw != w and tw not in ALLOWED[w]:
        out.append(f"{module} imports {t}")
  return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import loops among modules (each as the path round it), by depth-first search."""
  state, stack, found = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(graph.get(m, ())):
      if state.get(t) == "open":
        found.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  return found


def test_the_package_has_each_wing():
  graph = package_imports()
  for w in ALLOWED:
    assert any(wing(m) == w for m in graph), f"no module in swapmoe_jax/{w}/"
  assert "swapmoe_jax.moe.layer" in graph and "swapmoe_jax.models.switch.model" in graph


def test_imports_only_point_down():
  assert layering_violations(package_imports()) == []


def test_no_module_imports_in_a_loop():
  assert cycles(package_imports()) == []


def test_the_moe_layer_imports_only_jax_flax_and_numpy():
  """The reusable layer's outside dependencies, from every import in moe/."""
  outside = set()
  for folder, _, files in os.walk(os.path.join(ROOT, "moe")):
    for name in (f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
          outside |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
          outside.add(node.module.split(".")[0])
  assert outside - {"__future__", "typing", "collections", "dataclasses", "functools", "math"} == {
      "jax", "flax", "numpy", "swapmoe_jax"}


@pytest.mark.parametrize("bad, expected", [
    ({"swapmoe_jax.moe.layer": {"swapmoe_jax.serving.sharding"}, "swapmoe_jax.serving.sharding": set()},
     ["swapmoe_jax.moe.layer imports swapmoe_jax.serving.sharding"]),
    ({"swapmoe_jax.models.switch.model": {"swapmoe_jax.serving.decode"}, "swapmoe_jax.serving.decode": set()},
     ["swapmoe_jax.models.switch.model imports swapmoe_jax.serving.decode"]),
    ({"swapmoe_jax.serving.loader": {"swapmoe_jax.builtin.demo"}, "swapmoe_jax.builtin.demo": set()},
     ["swapmoe_jax.serving.loader imports swapmoe_jax.builtin.demo"]),
    ({"swapmoe_jax.serving.loader": {"swapmoe_jax.models.switch.model"}, "swapmoe_jax.models.switch.model": set()},
     []),
])
def test_the_checks_catch_what_they_are_for(bad, expected):
  """The rules fire on the import that used to close the loop (moe -> sharding), and on its kin."""
  assert layering_violations(bad) == expected


def test_the_loop_check_finds_the_old_loop():
  old = {"swapmoe_jax.decode": {"swapmoe_jax.moe"}, "swapmoe_jax.moe": {"swapmoe_jax.sharding"},
         "swapmoe_jax.sharding": {"swapmoe_jax.executor", "swapmoe_jax.moe"},
         "swapmoe_jax.executor": {"swapmoe_jax.decode"}}
  assert cycles(old) == [["swapmoe_jax.decode", "swapmoe_jax.moe", "swapmoe_jax.sharding", "swapmoe_jax.executor",
                          "swapmoe_jax.decode"],
                         ["swapmoe_jax.moe", "swapmoe_jax.sharding", "swapmoe_jax.moe"]]
