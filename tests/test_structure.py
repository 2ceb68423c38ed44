"""The package's layout: subpackages in layers that import only downwards, no import cycles, no
test module importing another, and every third-party import declared in pyproject.toml (the
package's in its dependencies, the tests' in those or the test extra), every runtime dependency
imported."""

import ast
import functools
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "fiftyone_grounding"

# Each layer imports only from the layers listed before it (and itself). The bottom modules are
# the package's own top-level files below everything; cli and demo sit above everything.
BOTTOM = {"errors", "hub", "progress", "runs", "fiftyone_api", "devices"}  # fiftyone_api: FiftyOne's private names
LAYERS = ["bottom", "models", "data", "evaluation", "sources", "engine", "inference", "qa", "app", "top"]
MAY_IMPORT = {
    "bottom": {"bottom"},
    "models": {"bottom", "models"},
    "data": {"bottom", "models", "data"},
    "evaluation": {"bottom", "models", "data", "evaluation"},  # metrics: training reports them too
    "sources": {"bottom", "models", "data", "sources"},
    "engine": {"bottom", "models", "data", "evaluation", "engine"},
    "inference": {"bottom", "models", "data", "evaluation", "inference"},
    # label QA trains fold models (engine) and reads their boxes (inference)
    "qa": {"bottom", "models", "data", "evaluation", "engine", "inference", "qa"},
    "app": {"bottom", "models", "data", "sources", "engine", "inference", "evaluation", "qa", "app"},
    "top": set(LAYERS),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    head = module.split(".")[0]
    if head in MAY_IMPORT and head not in ("bottom", "top"):
        return head
    if module in BOTTOM or module == "":
        return "bottom"
    return "top"  # cli, demo


def _imports() -> dict[str, set[str]]:
    """Module (dotted, inside the package) -> the package modules it imports anywhere (top level
    or inside functions). The plugin folder is FiftyOne's entry point, above the package."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "plugin":
            continue
        name = _module_name(path)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = [p for p in package if p]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    deps.add(".".join(base + node.module.split(".")))
                else:  # from . import boxes
                    deps.update(".".join(base + [alias.name]) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fiftyone_grounding."):
                deps.add(node.module.removeprefix("fiftyone_grounding."))
        graph[name] = {d for d in deps if d} - {name}
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
    assert len(graph) > 40, "no modules found"
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, {name: sorted(graph[name]) for name in cycles}


def test_each_layer_imports_only_the_layers_below_it():
    """models/ knows nothing of data, training, inference or the App; data/ nothing of metrics,
    sources, training or inference; evaluation (the metrics, which training reports too) reads
    what inference wrote without importing it; training and inference know nothing of each other
    or of the sources; only app/, cli and demo see everything."""
    graph = _imports()
    assert {_layer(m) for m in graph} == set(LAYERS), sorted({_layer(m) for m in graph})
    wrong = {m: sorted(d for d in deps if _layer(d) not in MAY_IMPORT[_layer(m)])
             for m, deps in graph.items()}
    assert not {m: d for m, d in wrong.items() if d}


def test_the_bottom_modules_are_the_few_named():
    top_level = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top_level == BOTTOM | {"cli", "demo"}, sorted(top_level ^ (BOTTOM | {"cli", "demo"}))


def test_no_test_module_imports_another():
    """Shared helpers live in conftest.py (fixtures) or tests/helpers.py."""
    tests = REPO / "tests"
    names = {p.stem for p in tests.glob("test_*.py")}
    found = {}
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            hits = [m for m in mods if m.split(".")[-1] in names or m.split(".")[0] in names]
            if hits:
                found.setdefault(path.name, []).extend(hits)
    assert not found, found


REPO = PACKAGE.parent
# -- dependencies declared where they are used ------------------------------------------------------


def _third_party_imports(folder: Path, skip: set = frozenset()) -> dict[str, set[str]]:
    """Top-level module -> the files of ``folder`` that import it (anywhere in the file), less the
    standard library, this package and ``skip`` (local modules)."""
    import sys

    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
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


def test_fiftyone_private_names_are_read_in_one_module():
    """``_root_dataset``, ``_doc`` and raw database queries only through fiftyone_api.py."""
    import re

    private = re.compile(r"\._root_dataset\b|\._doc\b|get_db_conn")
    found = [f"{path.relative_to(PACKAGE)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "fiftyone_api.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert not found, found


def test_the_command_line_starts_without_torch_or_fiftyone():
    """``fiftyone-grounding --help`` (and every subcommand's parser) is read without loading torch,
    transformers or FiftyOne: each subcommand imports what it runs when it runs."""
    import subprocess
    import sys

    code = ("import sys; from fiftyone_grounding.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'fiftyone') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_only_apply_model_loads_fiftyones_torch_utilities():
    """FiftyOne's torch utilities load torchvision's models (seconds of imports per process):
    only get_item.py (FiftyOne's get-item for ``dataset.apply_model``) imports them, and only
    from inside a function, so training, the fast apply path and search never load them."""
    heavy = {"fiftyone.utils.torch", "torchvision"}
    at_top = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n in heavy or n.split(".")[0] == "torchvision" for n in names):
                at_top.setdefault(_module_name(path), []).extend(names)
    assert set(at_top) == {"inference.get_item"}, at_top
    graph = _imports()
    importers = {m for m, deps in graph.items() if "inference.get_item" in deps}
    assert importers == {"inference.model"}, importers
    model_tree = ast.parse((PACKAGE / "inference" / "model.py").read_text())
    top_level = {node.module for node in model_tree.body if isinstance(node, ast.ImportFrom)}
    assert "get_item" not in top_level, "inference/model.py must import get_item inside build_get_item"
