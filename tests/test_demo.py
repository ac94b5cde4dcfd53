"""`make demo`'s script: tiny models built offline, a text and an image runner, a streamed chat, an image."""

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
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--max-new-tokens", "12"], env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    # Two turns of a chat, each streamed and finished by the tiny Mistral, then one image.
    assert out.count("[you] ") == 3 and out.count("(length; usage") == 2, out
    assert "'completion_tokens': 12" in out
    assert "step 4/4" in out and "==> the PNG: http://127.0.0.1:" in out
    # The same model through the official OpenAI client, streamed, with usage at the end.
    assert "[you, via the openai package]" in out and "'completion_tokens': 12" in out.split("openai package]")[1]
    assert 'OpenAI(base_url="http://127.0.0.1:' in out and "/admin" in out
    key = out.split("Your demo API key:\n", 1)[1].splitlines()[0]
    assert key.startswith("hx_") and f"Bearer {key}" in out
    assert (tmp_path / "helix.db").exists()
    assert (tmp_path / "models" / "tiny-mistral" / "config.json").exists()
    assert (tmp_path / "models" / "tiny-sdxl" / "model_index.json").exists()
    pngs = [p for p in (tmp_path / "files").rglob("*.png")]
    assert len(pngs) == 1 and pngs[0].read_bytes().startswith(b"\x89PNG")
