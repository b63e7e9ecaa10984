import importlib
import sys
import textwrap

import pytest
from helpers import make_backend, make_images

from earlyexit.plugins.registry import DISABLE_AUTOLOAD_ENV, get_registry


@pytest.fixture(scope="session")
def registry():
    return get_registry(load_entrypoints=False)


@pytest.fixture(scope="session")
def backend6():
    """Six decoder layers: room for exits at 2 and 4."""
    return make_backend(seed=1, num_layers=6)


@pytest.fixture
def batch2(backend6):
    """Two rows with different prompt lengths, so the shorter one is left padded."""
    return backend6.prepare_inputs(make_images(2), ["a red circle", "two"])


@pytest.fixture
def install_distribution(tmp_path, monkeypatch):
    """Returns `install(dist_name, modules, entry_points)`, which writes modules and a
    `.dist-info` with `[earlyexit]` entry points into a folder on sys.path, as pip would."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    created_modules: list[str] = []

    def install(dist_name: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            created_modules.append(module)
        info = tmp_path / f"{dist_name.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text("[earlyexit]\n" + lines)
        importlib.invalidate_caches()

    yield install
    for module in created_modules:  # the next test must import its own copy
        sys.modules.pop(module, None)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests never read or write the user's cache (scenes, the embedded model)."""
    import os

    previous = os.environ.get("EARLYEXIT_CACHE")
    os.environ["EARLYEXIT_CACHE"] = str(tmp_path_factory.mktemp("earlyexit-cache"))
    yield
    if previous is None:
        os.environ.pop("EARLYEXIT_CACHE", None)
    else:
        os.environ["EARLYEXIT_CACHE"] = previous
