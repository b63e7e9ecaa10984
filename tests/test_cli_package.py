"""The CLI package: one module per command, shared options in `common`, no import circle."""

import ast
import pathlib
import subprocess
import sys

import earlyexit.cli

PACKAGE = pathlib.Path(earlyexit.cli.__file__).parent
COMMAND_MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__", "common"))


def imported_modules(path: pathlib.Path) -> set[str]:
    """Modules a file imports, relative ones resolved against earlyexit.cli ('.common' is
    earlyexit.cli.common, '.' the package itself); `from P import m` names P and P.m."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(["earlyexit", "cli"][:3 - node.level] if node.level else [])
            module = ".".join(part for part in (base, node.module or "") if part) if node.level else node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_commands_import_common_and_never_the_package_or_each_other():
    assert set(COMMAND_MODULES) >= {"listing", "run", "generate", "evaluation", "train", "build_tiny"}
    for stem in COMMAND_MODULES:
        imports = imported_modules(PACKAGE / f"{stem}.py")
        assert "earlyexit.cli" not in imports, stem  # the package itself: a circle
        assert not {f"earlyexit.cli.{other}" for other in COMMAND_MODULES} & imports, stem
        assert "earlyexit.cli.common" in imports, stem
    common = imported_modules(PACKAGE / "common.py")
    assert not {f"earlyexit.cli.{other}" for other in COMMAND_MODULES} & common and "earlyexit.cli" not in common


def test_every_command_module_imports_on_its_own():
    for stem in COMMAND_MODULES + ["common"]:
        result = subprocess.run([sys.executable, "-c", f"import earlyexit.cli.{stem}"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_shared_options_come_from_one_place():
    from earlyexit.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("run", "eval", "generate"):
        options = {o for action in commands[name]._actions for o in action.option_strings}
        assert {"--backend", "--model", "--strategy", "--exit-layers", "--threshold", "--batch-size" if name != "generate"
                else "--num-beams", "--option", "--kv-policy"} <= options, name
    assert "--output" in {o for a in commands["train"]._actions for o in a.option_strings}
