"""Shared fixtures: the genuine MNIST (never downloaded in tests) and small trained models.

Tests that need a Debian package (``@pytest.mark.system_package("chromium")``) skip with a
reason naming it when it is missing; with ``DIGITLAB_REQUIRE_ALL=1`` (set by CI) they fail instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


REQUIRE_ALL_ENV = "DIGITLAB_REQUIRE_ALL"
SYSTEM_PACKAGES = {  # Debian package -> the path the tests use from it
    "chromium": Path("/usr/bin/chromium"),
    "dataset-fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
}


@functools.cache
def mnist_dir() -> Path:
    """The genuine MNIST, where `digitlab train` finds it: $DIGITLAB_DATA_DIR, else the cache, else
    /usr/share/datasets/mnist. Never downloads (scripts/test.sh does that first)."""
    from digitlab.data import locate_dataset

    return locate_dataset(download=False, progress=False)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or, under DIGITLAB_REQUIRE_ALL=1, fail) a test whose system package is missing."""
    for marker in item.iter_markers("system_package"):
        package = marker.args[0]
        if not SYSTEM_PACKAGES[package].exists():
            reason = f"needs the Debian package {package} ({SYSTEM_PACKAGES[package]} is missing)"
            if os.environ.get(REQUIRE_ALL_ENV) == "1":
                pytest.fail(f"{reason}; {REQUIRE_ALL_ENV}=1 forbids skipping it", pytrace=False)
            pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from digitlab.data import load_mnist

    return load_mnist(mnist_dir(), download=False, progress=False)


@pytest.fixture(scope="session")
def small_model_path(tmp_path_factory: pytest.TempPathFactory, mnist) -> Path:
    """A lab CNN trained briefly (2,000 images, 2 epochs): quick, better than chance, not good."""
    from digitlab.runs import run_training
    from digitlab.train import TrainConfig

    run_dir = tmp_path_factory.mktemp("small-run")
    config = TrainConfig.from_recipe("lab", epochs=2, seed=0)
    result = run_training(config, data_dir=mnist_dir(), limit=2000, run_dir=run_dir, progress=False)
    return result.model_path


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    """The trained model shipped in the package (best recipe, > 99% test accuracy)."""
    from digitlab.predict import bundled_model_path

    path = bundled_model_path()
    assert path.is_file(), f"bundled model missing at {path}"
    return path
