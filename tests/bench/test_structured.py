"""bench.structured --quick on the tiny Mistral: every phase runs and the report has every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import structured

ROOT = Path(__file__).resolve().parents[2]

ROWS = ("every slot constrained", "4 free rows beside 4 constrained", "top_logprobs 5 on every slot",
        "schema compile: cold", "replies that parse and validate")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_quick_run_on_the_tiny_model_prints_every_figure(tiny_mistral, tmp_path):
    out = tmp_path / "structured.json"
    done = subprocess.run([sys.executable, "-m", "bench.structured", "--quick", "--model", str(tiny_mistral),
                           "--replies", "8", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    for row in ROWS:
        assert row in done.stdout, row
    figures = json.loads(out.read_text())
    assert figures["replies"] == 8
    # The tiny model's noise fills every string to its maxLength a byte at a time, so some replies run out of
    # budget; on SmolLM2 every constrained reply validates.
    assert 0.0 <= figures["free_valid_pct"] <= figures["constrained_valid_pct"] <= 100.0
    for key in ("constrained_tokens_per_s", "free_tokens_per_s", "neighbours_mixed_tokens_per_s",
                "neighbours_free_tokens_per_s", "logprobs_tokens_per_s", "compile_cold_ms", "compile_cached_ms"):
        assert figures[key] > 0, key
    assert "MISSES" in structured.report(figures) or "meets" in structured.report(figures)
