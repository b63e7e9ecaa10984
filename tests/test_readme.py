"""The README stays short, its results table comes from the committed result files, every
relative link in it and in docs/ leads somewhere, and its Python snippets run."""

import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|//)", re.I)


def results_table():
    spec = importlib.util.spec_from_file_location("results_table", os.path.join(ROOT, "benchmarks", "results_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose(text):
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(path):
    """GitHub's heading anchors of a Markdown file."""
    seen, found = {}, set()
    for line in FENCE.sub("", read(path)).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def code_block(text, section, language="python"):
    """The first fenced `language` block under the README heading `section`."""
    part = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", part, re.S).group(1)


def test_the_results_block_is_what_the_script_generates_from_the_committed_files():
    table = results_table()
    block = table.block_of(read(README))
    assert block == table.render(), "run `python benchmarks/results_table.py --write README.md`"
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert 1 <= len(rows) <= 8
    for source in (table.HEADLINE, table.SMOL):
        assert source in block and os.path.isfile(os.path.join(ROOT, source))
    assert "2 CPU cores" in block and "threads" in block


def test_the_readme_is_short():
    lines = read(README).count("\n")
    assert lines <= 260, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_every_relative_link_points_to_an_existing_file(page):
    broken = []
    for target in LINK.findall(prose(read(page))):
        if EXTERNAL.match(target):
            continue
        path, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved):
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.endswith(".md") and fragment not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{os.path.relpath(page, ROOT)}: broken links: {broken}"


def test_the_python_api_snippet_runs():
    namespace = {}
    exec(compile(code_block(read(README), "Python API"), "README.md", "exec"), namespace)
    assert namespace["ids"].shape[0] == 1 and namespace["model"].last_trace is not None


def test_the_plugin_example_installs_as_an_entry_point_registers_and_runs(install_distribution, capsys):
    """The README's plugin, installed as its pyproject snippet says, is listed and decodes."""
    import tomllib

    from PIL import Image

    from earlyexit.cli import main
    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.plugins import get_registry

    module_source = code_block(read(README), "Writing a plugin")
    entry_points = tomllib.loads(code_block(read(README), "Writing a plugin", "toml"))["project"]["entry-points"]
    install_distribution("earlyexit-myplugin", {"earlyexit_myplugin": module_source}, entry_points["earlyexit"])
    registry = get_registry()
    assert not registry.failures
    strategy_cls = registry.strategy("my-strategy")
    assert main(["list"]) == 0 and "my-strategy" in capsys.readouterr().out
    backend = registry.backend("blip2-opt").load("tiny-random")
    model = EarlyExitForCausalLM(backend, strategy_cls(backend, [3, 6]))
    inputs = backend.prepare_inputs([Image.new("RGB", (32, 32), "blue")], ["a"])
    assert model.generate(**inputs, max_new_tokens=3).shape[0] == 1
    assert len(model.last_trace.per_sequence()[0]) >= 1  # the engine ran the plugin's rule at its exits

