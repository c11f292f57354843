"""Shared fixtures: the backends, seeded synthetic data, and the one way to find ../shared."""
import os
from pathlib import Path

import pytest

from cannon_fast.core.backends import available_backends


def _shared_dir():
    """../shared next to the repository (override with CANNON_FAST_SHARED)."""
    env = os.environ.get("CANNON_FAST_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
    """The project's shared data folder; skip outside CI when absent, fail in CI."""
    path = _shared_dir()
    if not (path / "data" / "real").is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared data folder is missing: {path}")
        pytest.skip(f"shared data folder not found at {path} (set CANNON_FAST_SHARED)")
    return path


@pytest.fixture(params=available_backends())
def backend(request):
    """Every backend available on this machine (numpy reference, numba, c)."""
    return request.param


@pytest.fixture(params=[b for b in available_backends() if b != "numpy"])
def fast_backend(request):
    """Every available backend but the numpy reference: what a comparison with it can test."""
    return request.param
