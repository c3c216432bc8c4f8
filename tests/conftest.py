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
