"""The package's layout: no import cycles, and inference does not depend on training code."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fiftyone_grounding"


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (top level or inside functions)."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:  # from . import boxes
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fiftyone_grounding."):
                deps.add(node.module.split(".")[1])
        graph[name] = deps - {name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_module_imports_itself_through_others():
    graph = _imports()
    assert graph, "no modules found"
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, {name: sorted(graph[name]) for name in cycles}


@pytest.mark.parametrize("module, forbidden", [
    ("fiftyone_model", {"data", "train", "synthetic", "cache"}),
    ("apply", {"data", "train", "synthetic", "cache"}),
    ("zoo", {"data", "train", "synthetic", "cache"}),
    ("encoders", {"synthetic", "data", "train"}),
    ("model", {"data", "train", "synthetic", "fiftyone_model", "apply"}),
])
def test_layers_do_not_reach_up(module, forbidden):
    """Inference, the zoo source, the encoders and the model never load training-data code."""
    assert not _reachable(_imports(), module) & forbidden
