"""bench.scheduling at tiny counts: every scenario runs against a real `helix serve` and the report has every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import scheduling

ROOT = Path(__file__).resolve().parents[2]

ROWS = ("adapter loads per 100 tasks", "small user's p50 wait, big user", "small user's p99 wait",
        "small user's p50 wait, no big user", "fine-tune wait behind continue chats", "new-session wait under",
        "start estimate's error", "bench.dispatch full cycles/s", "runners wanted vs a perfect scaler")


@pytest.mark.slow
def test_a_tiny_run_prints_every_figure_with_the_rule_on_and_off(tmp_path):
    out = tmp_path / "scheduling.json"
    done = subprocess.run([sys.executable, "-m", "bench.scheduling", "--tiny", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    for row in ROWS:
        assert row in done.stdout, row
    assert "not run" not in done.stdout
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    figures = result["figures"]
    # The rules that need no other helper's work give figures both ways.
    for key in ("cold_loads_per_100", "warm_loads_per_100", "small_alone_p50_ms", "small_fifo_p50_ms",
                "small_fair_p50_ms", "small_capped_p50_ms", "finetune_wait_s", "new_off_p50_s", "new_on_p50_s",
                "cycles_on_per_s", "cycles_off_per_s"):
        assert key in figures, key
    # What another helper adds is read when present, else said to be absent.
    assert "estimate_error_pct" in figures or "n/a (no estimate in the session JSON)" in done.stdout
    assert "scaling_lag_s" in figures or "n/a (no helix_runners_wanted" in done.stdout


def test_the_report_says_which_scenarios_failed_and_why():
    result = {"quick": True, "fleet": 32, "service_ms": 50.0, "load_ms": 300.0, "database": "sqlite",
              "errors": {"warm": "RuntimeError: boom"}, "estimate": {"present": False}, "scaling": {"present": False}}
    text = scheduling.report(result)
    assert "not run: RuntimeError: boom" in text
    assert "n/a (no estimate in the session JSON)" in text and "n/a (no helix_runners_wanted" in text


def test_a_warm_run_that_loaded_nothing_reads_as_a_floor():
    warm = {"off": {"per_100": 90.0, "tasks": 100}, "on": {"per_100": 0.0, "tasks": 100}}
    assert scheduling._load_ratio(warm) == (90.0, True)
