"""Every benchmark of issue 12 in one run, and one table of its targets side by side (`make bench`).

    .venv/bin/python -m bench.all             # dispatch, cycle, streaming, fleet, replicas, scheduling, structured
    .venv/bin/python -m bench.all --quick     # smaller counts
    .venv/bin/python -m bench.all --only dispatch,streaming

Each phase runs on its own: one that fails (or whose module is not written yet) leaves its rows as
"not run: <why>" and the others still run. Progress goes to stderr; the table, then each phase's own
report, to stdout. The table's rows and verdicts come from `bench.targets`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import targets  # noqa: E402
from bench.report import _git_revision, describe_machine  # noqa: E402

logger = logging.getLogger("bench.all")

PHASES = ("dispatch", "cycle", "streaming", "fleet", "replicas", "scheduling", "structured")
# What bench.fleet.measure() and bench.replicas.measure() return, by the names this table reads
# (the first that is present wins; a dotted name reads a nested dict), so either module can be
# written without waiting on this one.
FIGURE_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "fleet": {"idle_cpu_pct": ("idle_cpu_pct", "idle_api_cpu_pct", "many.idle_cpu_pct"),
              "rss_mb": ("rss_mb", "api_rss_mb", "memory.rss_sum_mb"),
              "p50_ms": ("p50_ms", "dispatch_p50_ms", "many.sent_p50_ms"),
              "p50_1_ms": ("p50_1_ms", "one_runner_p50_ms", "one.sent_p50_ms")},
    "cycle": {f"{db}.{protocol}_ms": (f"current.{db}.{protocol}.cycle_ms",)
              for db in ("sqlite", "postgres") for protocol in ("seed", "runner")},
    "replicas": {"p50_ms": ("p50_ms", "dispatch_p50_ms", "cross_p50_ms", "cross.sent_p50_ms"),
                 "single_p50_ms": ("single_p50_ms", "one_replica_p50_ms", "single.sent_p50_ms"),
                 "tokens_cross": ("tokens_cross", "follower_ok", "tokens_reach_follower")},
    # bench.scheduling's flat figures (issue 23), each rule on beside off.
    "scheduling": {key: (f"figures.{key}",) for key in (
        "warm_loads_per_100", "cold_loads_per_100", "small_fair_p50_ms", "small_alone_p50_ms", "finetune_wait_s",
        "estimate_error_pct", "cycles_on_per_s", "cycles_off_per_s")},
    # bench.structured's flat figures (issue 25): constrained decoding on SmolLM2 on CPU.
    "structured": {key: (key,) for key in (
        "constrained_tokens_per_s", "free_tokens_per_s", "neighbours_mixed_tokens_per_s",
        "neighbours_free_tokens_per_s", "constrained_valid_pct")},
}


class Skipped(RuntimeError):
    """A phase that cannot run here (its module is not written yet); not a failure."""


@dataclass
class Outcome:
    """What one phase gave: figures for the table, its own report, why figures are missing, if it failed."""

    figures: dict[str, Any] = field(default_factory=dict)
    report: str = ""
    reasons: dict[str, str] = field(default_factory=dict)  # by figure-key prefix: "dispatch.sqlite"
    failed: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="each benchmark's --quick counts")
    p.add_argument("--only", default=",".join(PHASES), help=f"a comma-separated subset of {', '.join(PHASES)}")
    p.add_argument("--json", type=Path, default=None, help="also write the figures and raw results here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if set(args.only) - set(PHASES):
        p.error(f"--only: a subset of {', '.join(PHASES)}")
    return args


# the phases: each returns an Outcome


def run_dispatch(quick: bool) -> Outcome:
    """bench.dispatch's Helix runs (SQLite, PostgreSQL) and Celery, the phases the targets need."""
    from bench import dispatch
    from bench.celery_load import run_celery
    from bench.helix_load import run_helix
    from bench.report import build_report, package_versions

    argv = ["--phases", "long,throughput", "--runners", "1,100"] + (["--quick"] if quick else [])
    args = dispatch.parse_args(argv)
    ctx = mp.get_context("spawn")
    workdir = Path(tempfile.mkdtemp(prefix="helix-bench-all-"))
    machine, versions = describe_machine(), package_versions(args)
    started, results, out = time.monotonic(), {}, Outcome()
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("sqlite", lambda: run_helix("sqlite", ctx, workdir, args)),
        ("postgres", lambda: run_helix("postgres", ctx, workdir, args)),
        ("celery", lambda: run_celery(workdir, args))]
    for name, step in steps:
        try:
            results[name] = step()
        except Exception as exc:
            logger.exception("dispatch on %s failed", name)
            out.reasons[f"dispatch.{name}"] = why(exc)
            out.failed = True
    if out.failed:
        logger.error("dispatch logs kept in %s", workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    out.figures = dispatch_figures(results)
    out.report = build_report(results, args, machine, versions, time.monotonic() - started)
    return out


def dispatch_figures(results: dict[str, Any]) -> dict[str, Any]:
    """The table's figures out of bench.dispatch's results."""
    figures: dict[str, Any] = {}
    for name in ("sqlite", "postgres", "celery"):
        res = results.get(name) or {}
        tput = res.get("throughput") or {}
        figures[f"dispatch.{name}.cycles_per_s"] = tput.get("per_second")
        figures[f"dispatch.{name}.cpu_ms_per_cycle"] = tput.get("server_cpu_ms")
        figures[f"dispatch.{name}.rss_mb"] = (res.get("memory") or {}).get("rss_sum_mb")
        lp = (res.get("long") or {}).get(100) or {}
        figures[f"dispatch.{name}.lp100_p50_ms"] = lp.get("sent_p50_ms")
        figures[f"dispatch.{name}.lp100_p99_ms"] = lp.get("sent_p99_ms")
    latency = (results.get("celery") or {}).get("latency") or {}
    figures["dispatch.celery.p50_ms"] = latency.get("sent_p50_ms")
    figures["dispatch.celery.p99_ms"] = latency.get("sent_p99_ms")
    return {k: v for k, v in figures.items() if v is not None}


def run_streaming(quick: bool) -> Outcome:
    """bench.streaming, both variants; the table reads the grouped one (4 tokens per stream per post)."""
    from bench import streaming

    args = streaming.parse_args(["--quick"] if quick else [])
    try:
        result = streaming.measure(args)
    except streaming.NotSupported as exc:
        return Outcome(reasons={"streaming": str(exc)}, failed=True)
    out = Outcome(report=streaming.report(result, args))
    grouped = result["variants"].get("grouped") or {}
    if grouped.get("problems"):  # a rate of tokens that arrived wrong is no figure
        out.reasons["streaming"] = f"{len(grouped['problems'])} problem(s), first: {grouped['problems'][0][:120]}"
        out.failed = True
        return out
    figures = {"streaming.tokens_per_s": grouped.get("tokens_per_s"),
               "streaming.cpu_ms_per_1k": grouped.get("api_cpu_ms_per_1k")}
    out.figures = {k: v for k, v in figures.items() if v is not None}
    return out


def run_module(phase: str, quick: bool) -> Outcome:
    """bench.<phase>.measure() of a module another engineer writes, if it exists yet.

    `measure(args)` gets `parse_args(["--quick"])` (or `[]`); a `measure()` with keyword parameters
    gets the module's `QUICK` keywords with --quick, else its own defaults.
    """
    try:
        mod = importlib.import_module(f"bench.{phase}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{phase}":
            raise Skipped(f"bench.{phase} is not written yet") from exc
        raise
    if not hasattr(mod, "measure"):
        raise Skipped(f"bench.{phase} has no measure()")
    if "args" in inspect.signature(mod.measure).parameters:
        argv = ["--quick"] if quick else []
        args: Any = mod.parse_args(argv) if hasattr(mod, "parse_args") else argparse.Namespace(quick=quick)
        result = mod.measure(args)
    else:
        args, result = None, mod.measure(**(getattr(mod, "QUICK", {}) if quick else {}))
    if not hasattr(mod, "report"):
        text = json.dumps(result, indent=2, default=str)
    elif len(inspect.signature(mod.report).parameters) > 1:
        text = mod.report(result, args)
    else:
        text = mod.report(result)
    return Outcome(figures=module_figures(phase, result), report=text)


def _lookup(result: dict[str, Any], name: str) -> Any:
    value: Any = result
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def module_figures(phase: str, result: dict[str, Any]) -> dict[str, Any]:
    """The table's figures out of bench.fleet's or bench.replicas' measure() result."""
    figures = {}
    for key, names in FIGURE_NAMES[phase].items():
        value = next((v for v in (_lookup(result, n) for n in names) if v is not None), None)
        if value is not None:
            figures[f"{phase}.{key}"] = value
    return figures


def why(exc: BaseException) -> str:
    """An exception in one line, for a "not run: ..." cell."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def run_phases(only: list[str], quick: bool) -> dict[str, Outcome]:
    """Each selected phase in turn, none able to stop the next; an Outcome for every phase."""
    runners: dict[str, Callable[[], Outcome]] = {
        "dispatch": lambda: run_dispatch(quick), "streaming": lambda: run_streaming(quick),
        "cycle": lambda: run_module("cycle", quick),
        "fleet": lambda: run_module("fleet", quick), "replicas": lambda: run_module("replicas", quick),
        "scheduling": lambda: run_module("scheduling", quick), "structured": lambda: run_module("structured", quick)}
    outcomes: dict[str, Outcome] = {}
    for phase in PHASES:
        if phase not in only:
            outcomes[phase] = Outcome(reasons={phase: "left out (--only)"})
            continue
        logger.info("=== %s", phase)
        started = time.monotonic()
        try:
            outcomes[phase] = runners[phase]()
        except Skipped as exc:
            logger.warning("%s: %s", phase, exc)
            outcomes[phase] = Outcome(reasons={phase: str(exc)})
        except (Exception, SystemExit) as exc:  # SystemExit: a phase's argparse refused what we passed
            logger.exception("%s failed", phase)
            outcomes[phase] = Outcome(reasons={phase: why(exc)}, failed=True)
        logger.info("=== %s took %.0f s", phase, time.monotonic() - started)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Run the phases and print the targets table, then each phase's report; 1 if a phase failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    machine = describe_machine()
    started = time.monotonic()
    outcomes = run_phases(args.only, args.quick)
    figures = {k: v for o in outcomes.values() for k, v in o.figures.items()}
    reasons = {k: v for o in outcomes.values() for k, v in o.reasons.items()}
    print("Helix benchmark targets (issue 12)")
    print(f"command: {' '.join(getattr(sys, 'orig_argv', sys.argv))}; code: {_git_revision()}")
    print(f"machine: {machine['logical_cpus']} logical CPUs, {machine['cpu']}; load avg at start "
          f"{machine['loadavg']}, at end {describe_machine()['loadavg']}; {time.monotonic() - started:.0f} s")
    print()
    print(targets.render(figures, reasons))
    for phase, outcome in outcomes.items():
        if outcome.report:
            print(f"\n===== {phase} =====\n{outcome.report}")
    print(flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"figures": figures, "reasons": reasons}, indent=2, default=str))
    return 1 if any(o.failed for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
