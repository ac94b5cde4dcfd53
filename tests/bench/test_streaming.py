"""bench.streaming end to end at tiny counts: a real `helix serve`, real runner and follower processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from bench import streaming

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--runners", "2", "--streams", "2", "--tokens", "30", "--follower-procs", "1"]


def _run(tmp_path: Path, *argv: str) -> tuple[str, dict]:
    out = tmp_path / "streaming.json"
    done = subprocess.run([sys.executable, "-m", "bench.streaming", *TINY, "--json", str(out), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def _columns(report: str, label: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(label))
    return line[len(label):].split()


@pytest.mark.slow
def test_tiny_run_prints_figures_for_both_variants(tmp_path):
    report, raw = _run(tmp_path)
    assert _columns(report, "figure") == ["grouped", "single"]
    rates = _columns(report, "tokens/s stored and delivered (the lower)")
    assert len(rates) == 2 and all(float(r.removesuffix("/s").replace(",", "")) > 0 for r in rates)
    assert _columns(report, "followers whose text equals the runner's") == ["4", "4"]
    assert _columns(report, "stored replies equal to the runner's text") == ["4", "4"]
    assert "grouped problems: none" in report and "single problems: none" in report
    grouped, single = raw["variants"]["grouped"], raw["variants"]["single"]
    assert grouped["delivered"] == grouped["stored"] == single["delivered"] == 4 * 30
    # grouped: a runner's two streams share each post (30 tokens at 4 a post: 8 posts a runner)
    assert (grouped["posts"], single["posts"]) == (2 * 8, 4 * 8)
    assert grouped["api_cpu_ms_per_1k"] > 0
    assert grouped["client_cpu_ms_per_1k"] >= 0  # os.times() ticks at 10 ms: tiny runs may read 0
    assert 0 < grouped["lag_p50_ms"] <= grouped["lag_p99_ms"]


@pytest.mark.slow
@pytest.mark.postgres
def test_followers_on_a_second_replica_get_every_token(tmp_path, postgres_server):
    admin = make_url(postgres_server).set(drivername="postgresql").render_as_string(hide_password=False)
    report, raw = _run(tmp_path, "--replicas", "2", "--variants", "grouped", "--tokens", "300",
                       "--pg-admin-url", admin)
    assert "followers on:" in report
    grouped = raw["variants"]["grouped"]
    assert grouped["texts_ok"] == grouped["stored_texts_ok"] == 4 and not grouped["problems"]
    # the followers read from the second server, whose CPU was measured apart (a tiny run may take it
    # under one 10 ms tick of the process clock, so the figure itself may read 0)
    assert raw["replica"] and raw["replica"].split("--port ")[1].split()[0] not in raw["command"]
    assert grouped["follow_api_cpu_ms_per_1k"] is not None


def test_bus_refused_in_one_line_when_the_api_has_no_bus_setting(monkeypatch):
    from helix_api.config import Config

    monkeypatch.delattr(Config, "BUS_URL", raising=False)
    args = streaming.parse_args(["--bus", "redis://127.0.0.1:6379/14"])
    with pytest.raises(streaming.NotSupported, match="no HELIX_BUS_URL setting"):
        streaming.measure(args)
