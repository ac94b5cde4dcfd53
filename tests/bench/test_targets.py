"""The targets table `make bench` prints: rows, figures and verdicts, on made-up figures."""

from __future__ import annotations

import pytest

from bench import all as bench_all
from bench import targets
from bench.stream_clients import MAX_TOKENS, TOKEN_WIDTH, full_text, token


def _row(cells: list[list[str]], figure: str) -> list[str]:
    return next(row for row in cells if row[0] == figure)


FIGURES = {
    "dispatch.sqlite.cycles_per_s": 650.0, "dispatch.postgres.cycles_per_s": 300.0,
    "dispatch.celery.cycles_per_s": 600.0,
    "dispatch.sqlite.cpu_ms_per_cycle": 1.5, "dispatch.postgres.cpu_ms_per_cycle": 13.8,
    "dispatch.celery.cpu_ms_per_cycle": 1.7,
    "dispatch.sqlite.lp100_p50_ms": 5.0, "dispatch.celery.p50_ms": 4.2,
    "dispatch.sqlite.lp100_p99_ms": 9.0, "dispatch.celery.p99_ms": 6.5,
    "streaming.tokens_per_s": 2518.0, "streaming.cpu_ms_per_1k": 344.0,
    "fleet.idle_cpu_pct": 3.0, "fleet.rss_mb": 280.0, "fleet.p50_ms": 8.0, "fleet.p50_1_ms": 5.0,
    "replicas.tokens_cross": True,
    "dispatch.postgres.rss_mb": 191.0, "dispatch.celery.rss_mb": 90.0,
}


def test_every_target_of_the_issue_has_a_row():
    cells = targets.rows({}, {})
    assert cells[0] == ["figure", "target", "Helix", "peer (Celery + Redis)", "verdict"]
    # With the four cycle rows, issue 23's six scheduling rows and issue 25's three structured-output rows.
    assert len(cells) == 1 + len(targets.TARGETS) == 28


def test_absolute_bounds_meet_and_miss():
    cells = targets.rows(FIGURES, {})
    assert _row(cells, "API CPU per full cycle, SQLite")[2:] == ["1.50 ms", "1.70 ms", "meets"]
    assert _row(cells, "API CPU per full cycle, PostgreSQL")[4] == "MISSES"
    assert _row(cells, "long-poll dispatch p99, 100 runners waiting (SQLite)")[4] == "meets"
    streaming = _row(cells, "streaming 8x8, one API process: tokens/s stored and delivered")
    assert streaming[1:] == [">= 20,000/s", "2,518/s", "", "MISSES"]
    assert _row(cells, "streaming 8x8: API CPU per 1,000 tokens")[4] == "MISSES"
    assert _row(cells, "API RSS, PostgreSQL default")[2:] == ["191 MB", "90.0 MB", "MISSES"]


def test_bounds_relative_to_the_peer_show_the_ratio():
    cells = targets.rows(FIGURES, {})
    sqlite = _row(cells, "full cycles/s, SQLite, vs Celery + Redis")
    assert sqlite[1:] == [">= 1x Celery", "650/s", "600/s", "meets (1.08x)"]
    assert _row(cells, "full cycles/s, PostgreSQL, vs Celery + Redis")[4] == "MISSES (0.50x)"
    assert _row(cells, "long-poll dispatch p50, 100 runners waiting (SQLite)")[4] == "MISSES (1.19x)"


def test_bound_relative_to_another_figure_of_ours():
    cells = targets.rows(FIGURES, {})
    fleet = _row(cells, "1,000 runners long-polling: dispatch p50")
    assert fleet[1] == "<= 1.5x the 1-runner p50"
    assert fleet[4] == "MISSES (1.60x)"
    assert _row(cells, "1,000 runners long-polling: idle API CPU")[2:] == ["3.00%", "", "meets"]


def test_a_yes_or_no_target():
    assert _row(targets.rows(FIGURES, {}), "3 replicas: tokens reach a follower on another replica")[2:] == \
        ["yes", "", "meets"]
    figures = {**FIGURES, "replicas.tokens_cross": False}
    assert _row(targets.rows(figures, {}), "3 replicas: tokens reach a follower on another replica")[4] == "MISSES"


def test_missing_figures_say_why_by_the_longest_prefix():
    reasons = {"fleet": "bench.fleet is not written yet", "dispatch.postgres": "RuntimeError: no server",
               "dispatch": "should not be used for postgres"}
    figures = {k: v for k, v in FIGURES.items()
               if not k.startswith(("fleet.", "dispatch.postgres.", "dispatch.celery.cycles"))}
    cells = targets.rows(figures, reasons)
    assert _row(cells, "1,000 runners long-polling: API RSS")[4] == "not run: bench.fleet is not written yet"
    assert _row(cells, "API RSS, PostgreSQL default")[4] == "not run: RuntimeError: no server"
    assert _row(cells, "full cycles/s, SQLite, vs Celery + Redis")[4] == \
        "not judged: no Celery figure (should not be used for postgres)"
    assert _row(cells, "3 replicas on one PostgreSQL: dispatch p50")[4] == "not run: no figure"


def test_rendered_table_lines_up():
    lines = targets.render(FIGURES, {}).splitlines()
    helix_right = lines[0].index("Helix") + len("Helix")  # numbers are right-aligned under their header
    assert lines[2][helix_right - len("650/s"):helix_right] == "650/s"
    assert lines[2].startswith("full cycles/s, SQLite, vs Celery + Redis")
    assert lines[2].endswith("meets (1.08x)")


def test_dispatch_figures_from_bench_dispatch_results():
    results = {
        "sqlite": {"long": {1: {"sent_p50_ms": 1.0}, 100: {"sent_p50_ms": 7.3, "sent_p99_ms": 14.7}},
                   "throughput": {"per_second": 94.0, "server_cpu_ms": 10.0}, "memory": {"rss_sum_mb": 119.0}},
        "celery": {"latency": {"sent_p50_ms": 4.2, "sent_p99_ms": 6.5},
                   "throughput": {"per_second": 607.0, "server_cpu_ms": 1.7}, "memory": {"rss_sum_mb": 80.0}},
    }
    assert bench_all.dispatch_figures(results) == {
        "dispatch.sqlite.cycles_per_s": 94.0, "dispatch.sqlite.cpu_ms_per_cycle": 10.0,
        "dispatch.sqlite.rss_mb": 119.0, "dispatch.sqlite.lp100_p50_ms": 7.3, "dispatch.sqlite.lp100_p99_ms": 14.7,
        "dispatch.celery.cycles_per_s": 607.0, "dispatch.celery.cpu_ms_per_cycle": 1.7,
        "dispatch.celery.rss_mb": 80.0, "dispatch.celery.p50_ms": 4.2, "dispatch.celery.p99_ms": 6.5}


def test_fleet_and_replicas_figures_by_any_of_their_names():
    assert bench_all.module_figures("fleet", {"idle_api_cpu_pct": 2.0, "rss_mb": 250.0, "dispatch_p50_ms": 4.0,
                                              "one_runner_p50_ms": 3.0, "other": 1}) == {
        "fleet.idle_cpu_pct": 2.0, "fleet.rss_mb": 250.0, "fleet.p50_ms": 4.0, "fleet.p50_1_ms": 3.0}
    assert bench_all.module_figures("replicas", {"tokens_cross": False}) == {"replicas.tokens_cross": False}
    nested = {"one": {"sent_p50_ms": 3.0}, "many": {"sent_p50_ms": 4.5, "idle_cpu_pct": 1.0},
              "memory": {"rss_sum_mb": 120.0}}
    assert bench_all.module_figures("fleet", nested) == {
        "fleet.idle_cpu_pct": 1.0, "fleet.rss_mb": 120.0, "fleet.p50_ms": 4.5, "fleet.p50_1_ms": 3.0}


def test_a_module_measured_with_keywords_gets_its_quick_keywords(monkeypatch):
    calls = []

    class Fleet:
        QUICK = {"runners": 100}

        @staticmethod
        def measure(runners: int = 1000) -> dict:
            calls.append(runners)
            return {"p50_ms": 2.0, "p50_1_ms": 1.0}

        @staticmethod
        def report(result: dict) -> str:
            return f"fleet of {calls[-1]}"

    monkeypatch.setattr(bench_all.importlib, "import_module", lambda name: Fleet)
    outcome = bench_all.run_module("fleet", quick=True)
    assert calls == [100]
    assert outcome.report == "fleet of 100"
    assert outcome.figures == {"fleet.p50_ms": 2.0, "fleet.p50_1_ms": 1.0}


def test_a_failing_phase_leaves_the_others_running(monkeypatch):
    def broken(quick: bool) -> bench_all.Outcome:
        raise RuntimeError("the server would not start\nlong traceback")

    monkeypatch.setattr(bench_all, "run_dispatch", broken)
    monkeypatch.setattr(bench_all, "run_streaming",
                        lambda quick: bench_all.Outcome(figures={"streaming.tokens_per_s": 1.0}, report="r"))
    outcomes = bench_all.run_phases(["dispatch", "streaming"], quick=True)
    assert outcomes["dispatch"].failed
    assert outcomes["dispatch"].reasons == {"dispatch": "RuntimeError: the server would not start"}
    assert outcomes["streaming"].figures == {"streaming.tokens_per_s": 1.0}
    assert outcomes["fleet"].reasons == {"fleet": "left out (--only)"}
    assert not outcomes["fleet"].failed


def test_a_phase_whose_argparse_refuses_our_flags_fails_alone(monkeypatch):
    def refuses(quick: bool) -> bench_all.Outcome:
        raise SystemExit(2)

    monkeypatch.setattr(bench_all, "run_dispatch", refuses)
    outcomes = bench_all.run_phases(["dispatch"], quick=True)
    assert outcomes["dispatch"].failed
    assert outcomes["dispatch"].reasons == {"dispatch": "SystemExit: 2"}


def test_a_module_not_written_yet_is_skipped_not_failed(monkeypatch):
    monkeypatch.setattr(bench_all.importlib, "import_module", _no_module)
    outcomes = bench_all.run_phases(["fleet"], quick=True)
    assert outcomes["fleet"].reasons == {"fleet": "bench.fleet is not written yet"}
    assert not outcomes["fleet"].failed


def _no_module(name: str):
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def test_tokens_have_one_width_and_differ_across_streams_and_positions():
    assert {len(token(s, i)) for s in (0, 7, 35, 36) for i in (0, 1, 1295, 1296, MAX_TOKENS - 1)} == {TOKEN_WIDTH}
    assert len({token(3, i) for i in range(MAX_TOKENS)}) == MAX_TOKENS
    assert full_text(1, 50) != full_text(2, 50)
    assert len(full_text(1, 50)) == 50 * TOKEN_WIDTH


@pytest.mark.parametrize("argv", [["--variants", "grouped,other"], ["--tokens", str(MAX_TOKENS + 1)]])
def test_streaming_refuses_bad_options(argv, capsys):
    from bench import streaming

    with pytest.raises(SystemExit):
        streaming.parse_args(argv)
    assert "--" in capsys.readouterr().err
