"""The package's structure: no import circle, dependencies point down the layers, and imports of
the project's own modules sit at the top of a module except where a torch-free start needs them."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Lowest first: a package may import its own layer and the ones before it, never a later one.
# `earlyexit` itself (the public surface) and the deprecated shims at the old paths stand outside.
LAYERS = [
    {"errors", "util"},
    {"data", "metrics"},
    {"core"},
    {"training"},
    {"backends", "strategies", "plugins"},
    {"models"},
    {"evaluation"},
    {"pipeline"},
    {"bench", "specs"},
    {"cli"},
]
SHIMS = {"backend", "strategy", "engine", "classifier_exits", "exit_training"}

# In-function imports of project modules are allowed only here, each with a `# lazy: why` comment
# on its line or the line above: these modules load for `earlyexit --help` and `earlyexit list`,
# which must not import torch.
LAZY_ALLOWED = {
    "earlyexit/cli/": "the command line's modules load for --help",
    "backends/": "plugin modules load for `earlyexit list`",
    "strategies/": "plugin modules load for `earlyexit list`",
    "earlyexit/core/backend.py": "the backend contract loads for `earlyexit list`",
}


def installed_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("backends", "strategies"):
        parts = ["earlyexit"] + parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> list[pathlib.Path]:
    return sorted(p for folder in ("earlyexit", "backends", "strategies") for p in (ROOT / folder).rglob("*.py"))


MODULES = {installed_name(p): p for p in project_files()}


def imports_of(path: pathlib.Path):
    """(imported project module, line, inside a function?) for every import in the file."""
    name = installed_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno, id(node) in in_function


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports_of(path)} for name, path in MODULES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle():
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in SHIMS:
        return None
    return next(k for k, layer in enumerate(LAYERS) if parts[1] in layer)


def test_every_subpackage_has_a_layer_and_imports_point_down():
    upward = []
    for module, targets in graph().items():
        mine = layer_of(module)
        for target in targets:
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_in_function_imports_of_project_modules_are_allowed_and_say_why():
    offending = []
    for name, path in MODULES.items():
        relative = path.relative_to(ROOT).as_posix()
        allowed = any(relative.startswith(prefix) for prefix in LAZY_ALLOWED)
        lines = path.read_text().splitlines()
        for target, line, in_function in imports_of(path):
            if not in_function:
                continue
            said = "# lazy:" in lines[line - 1] or lines[line - 2].strip().startswith("# lazy:")
            if not (allowed and said):
                offending.append(f"{relative}:{line} imports {target} inside a function")
    assert offending == []


def test_help_and_list_import_no_torch():
    code = ("import sys; from earlyexit.cli import build_parser; from earlyexit.plugins import get_registry; "
            "get_registry(); import earlyexit; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_public_surface_imports_from_the_package():
    import earlyexit

    for name in ("Strategy", "Backend", "hookimpl", "ExitView", "StepContext", "StrategyConfig", "TrainableConfig",
                 "config_field", "EarlyExitError", "ConfigError", "CONTRACT_VERSION"):
        assert hasattr(earlyexit, name), name
    from earlyexit.core.backend import Backend
    from earlyexit.core.strategy import Strategy

    assert earlyexit.Strategy is Strategy and earlyexit.Backend is Backend


@pytest.mark.parametrize("old, new, name", [
    ("earlyexit.strategy", "earlyexit.core.strategy", "Strategy"),
    ("earlyexit.backend", "earlyexit.core.backend", "Backend"),
    ("earlyexit.engine", "earlyexit.core.engine", "EarlyExitForCausalLM"),
    ("earlyexit.classifier_exits", "earlyexit.strategies.classifier_exits", "ClassifierExitStrategy"),
    ("earlyexit.exit_training", "earlyexit.training.exits", "train_exits"),
])
def test_old_paths_forward_with_a_deprecation_warning(old, new, name):
    import importlib

    shim, module = importlib.import_module(old), importlib.import_module(new)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(shim, name)
    assert value is getattr(module, name)
    assert [w.category for w in caught] == [DeprecationWarning] and new in str(caught[0].message)
    with pytest.raises(AttributeError):
        getattr(shim, "no_such_name")
