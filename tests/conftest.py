"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_h5() -> Path:
    """The shared USPS copy: $USPSJAX_DATA if set, else ../shared/data/usps.h5 next to the repo."""
    env = os.environ.get("USPSJAX_DATA")
    path = Path(env) if env else Path(__file__).parents[2] / "shared/data/usps.h5"
    if not path.is_file():
        pytest.fail(f"shared USPS file not found: {path}")
    return path


@pytest.fixture(scope="session")
def dataset(shared_h5):
    """The real USPS data, loaded once."""
    from uspsjax.data import load
    return load(str(shared_h5))


@pytest.fixture(scope="session")
def small(dataset):
    """A small real subset (512 train, 256 test) as device arrays, for fast training tests."""
    from uspsjax.train import Data
    import jax.numpy as jnp
    return Data(jnp.asarray(dataset.x_train[:512]), jnp.asarray(dataset.y_train[:512]),
                jnp.asarray(dataset.x_test[:256]), jnp.asarray(dataset.y_test[:256]))
