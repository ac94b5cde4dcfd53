"""`make demo`'s script: migrates, serves, makes a user, shows a queued session, prints the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_on_embedded_defaults(tmp_path):
    env = {**os.environ, "HELIX_DATA_DIR": str(tmp_path), "HELIX_DEMO_EXIT": "1"}
    env.pop("HELIX_DATABASE_URL", None)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "position 1 in the mistralai/Mistral-7B-Instruct-v0.1 queue" in done.stdout
    key = done.stdout.split("Your demo API key:\n", 1)[1].splitlines()[0]
    assert key.startswith("hx_") and f"Bearer {key}" in done.stdout
    assert (tmp_path / "helix.db").exists()
