"""The package's layout: no import cycles, inference does not depend on training code, and every
third-party import is declared in pyproject.toml (the package's in its dependencies, the tests' in
those or the test extra), every runtime dependency imported."""

import ast
import functools
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


# -- dependencies declared where they are used ------------------------------------------------------

REPO = PACKAGE.parent


def _third_party_imports(folder: Path, skip: set = frozenset()) -> dict[str, set[str]]:
    """Top-level module -> the files of ``folder`` that import it (anywhere in the file), less the
    standard library, this package and ``skip`` (local modules)."""
    import sys

    found: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != PACKAGE.name and top not in skip:
                    found.setdefault(top, set()).add(path.name)
    return found


def _distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement string ("scikit-learn>=1.3" -> "scikit-learn")."""
    import re

    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(runtime, test) distributions declared in pyproject.toml."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return ({_distribution(r) for r in project["dependencies"]},
            {_distribution(r) for r in project["optional-dependencies"]["test"]})


@functools.lru_cache(maxsize=1)
def _installed() -> dict:
    """Top-level module -> the installed distributions that provide it (a scan of every one)."""
    from importlib.metadata import packages_distributions

    return packages_distributions()


def _providers(module: str) -> set[str]:
    """The installed distributions that provide the top-level ``module`` (normalized names)."""
    return {_distribution(d) for d in _installed().get(module, [])}


def test_every_module_the_package_imports_is_a_declared_dependency():
    """An import of a distribution pyproject.toml does not declare (scipy before it was) fails
    here, whichever function it hides in: installing the package would not install it."""
    runtime, _ = _declared()
    imports = _third_party_imports(PACKAGE)
    assert {"numpy", "torch", "fiftyone", "scipy"} <= set(imports)  # the parse sees what it should
    unknown = sorted(m for m in imports if not _providers(m))
    assert not unknown, f"modules no installed distribution provides: {unknown}"
    undeclared = {m: sorted(files) for m, files in imports.items() if not _providers(m) & runtime}
    assert not undeclared, f"imported by the package but not in pyproject.toml's dependencies: {undeclared}"


def test_every_runtime_dependency_is_imported_by_the_package():
    """A runtime dependency the package never imports belongs elsewhere (torchmetrics: the test
    extra); the extra's distributions are not runtime dependencies too."""
    runtime, test_extra = _declared()
    provided = set().union(*(_providers(m) for m in _third_party_imports(PACKAGE)))
    assert not runtime - provided, f"declared but never imported by the package: {sorted(runtime - provided)}"
    assert not runtime & test_extra, sorted(runtime & test_extra)


def test_every_module_the_tests_import_is_declared_for_them():
    """The tests' imports come from the runtime dependencies or the test extra."""
    runtime, test_extra = _declared()
    tests = REPO / "tests"
    imports = _third_party_imports(tests, skip={path.stem for path in tests.glob("*.py")})
    undeclared = {m: sorted(files) for m, files in imports.items() if not _providers(m) & (runtime | test_extra)}
    assert not undeclared, f"imported by the tests but not declared (runtime or test extra): {undeclared}"


def test_the_zoo_manifest_requires_only_declared_dependencies():
    """FiftyOne's zoo refuses to load a model whose manifest names a package that is not installed
    (albumentations, after pyproject.toml dropped it, failed every zoo load on a clean machine):
    each package the manifest requires is a runtime dependency."""
    import json

    runtime, _ = _declared()
    models = json.loads((REPO / "manifest.json").read_text())["models"]
    assert models
    for model in models:
        required = {_distribution(p) for p in model["requirements"]["packages"]}
        assert required <= runtime, (model["base_name"], sorted(required - runtime))
