"""bench.cycle at tiny counts: a real `helix serve`, both protocols, and the statement counts it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import all as bench_all

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_tiny_run_reports_both_protocols_and_the_statements(tmp_path):
    out = tmp_path / "cycle.json"
    done = subprocess.run([sys.executable, "-m", "bench.cycle", "--only", "sqlite", "--cycles", "10",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    result = json.loads(out.read_text())
    sqlite = result["current"]["sqlite"]
    assert sqlite["seed"]["requests"] == 3.0
    assert sqlite["runner"]["requests"] < 2.2  # a create and a complete each, plus one claim per 8
    assert sqlite["seed"]["cycle_ms"] > 0 and sqlite["runner"]["cycle_ms"] > 0
    # The same counts the transitions test asserts, read by the benchmark in its own process.
    # The claim takes the user's turn too (fair shares).
    assert sqlite["statements"] == {"create": 8, "claim": 7, "complete": 8}
    assert "| sqlite |" in done.stdout


def test_the_targets_table_reads_the_cycle_figures():
    result = {"current": {"sqlite": {"seed": {"cycle_ms": 5.0}, "runner": {"cycle_ms": 4.0}},
                          "postgres": {"seed": {"cycle_ms": 6.0}, "runner": {"cycle_ms": 3.5}}}}
    assert bench_all.module_figures("cycle", result) == {
        "cycle.sqlite.seed_ms": 5.0, "cycle.sqlite.runner_ms": 4.0,
        "cycle.postgres.seed_ms": 6.0, "cycle.postgres.runner_ms": 3.5}
