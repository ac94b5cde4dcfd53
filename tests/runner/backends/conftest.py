"""Fixtures of the image backend's tests: the tiny SDXL pipeline loaded once per module, a fake file store."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.backends.sdxl import SDXLBackend
from tests.doubles import FakeFiles
from tests.runner.backends.image_doubles import tiny_config


@pytest.fixture(scope="module")
def sdxl_backend(tiny_sdxl: Path) -> SDXLBackend:
    """The SDXL backend with the tiny pipeline loaded once for the module."""
    backend = SDXLBackend(tiny_config(tiny_sdxl))
    backend.setup()
    return backend


@pytest.fixture
def files(tmp_path: Path) -> FakeFiles:
    """A fake file store for what a backend fetches and uploads."""
    return FakeFiles(tmp_path / "store")
