import pytest

from earlyexit.plugins import get_registry
from helpers import make_backend, make_images


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
