"""Shared fixtures: the genuine MNIST (never downloaded in tests) and small trained models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def mnist_dir() -> Path:
    """The genuine MNIST files: $DIGITLAB_DATA_DIR, else ../shared/data/mnist beside the repo."""
    return Path(os.environ.get("DIGITLAB_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "mnist"))


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
