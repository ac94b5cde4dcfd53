"""Fleet benchmark: a thousand runners long-polling one `helix serve` on SQLite.

    .venv/bin/python -m bench.fleet                    # 1,000 runners (about 2 minutes on 2 cores)
    .venv/bin/python -m bench.fleet --runners 300 --samples 20

Against one real `helix serve` (its defaults, on a throwaway SQLite database) it measures:

- dispatch latency, create sent -> claim received, with 1 runner waiting and then with N waiting
  (each runner a thread with its own keep-alive connection, spread over 4 processes, long-polling
  with wait=30), one task at a time, as bench.dispatch's long-poll rows do;
- the API's CPU while the N runners wait and nothing is queued, as a percentage of one core, over
  `--idle-seconds` (30: one whole long-poll, so the window holds every runner's next poll, as a
  fleet in its steady state sends one request per runner per `wait`; a shorter window that misses
  that wave would read about 0%);
- the API's peak RSS (master + workers) over the whole run.

`measure(...)` returns the figures as a dict, so an aggregate report can import it; run alone it
prints them beside the issue's targets. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.helix_load import measure_latency  # noqa: E402
from bench.helix_server import HelixApi  # noqa: E402
from bench.measures import fmt_summary  # noqa: E402
from bench.processes import TreeMemory  # noqa: E402

logger = logging.getLogger("bench.fleet")

TARGET_IDLE_CPU_PCT = 5.0
TARGET_RSS_MB = 300.0
TARGET_P50_RATIO = 1.5
QUICK = {"samples": 20, "warmup": 3}  # what bench.all passes with --quick: the fleet stays 1,000 strong


def measure(runners: int = 1000, *, samples: int = 50, warmup: int = 5, idle_seconds: float = 30.0,
            settle_seconds: float = 5.0, api_threads: int | None = None, api_log_level: str = "WARNING",
            workdir: Path | None = None) -> dict[str, Any]:
    """Dispatch p50/p99 with 1 and with `runners` waiting, idle API CPU % and peak API RSS."""
    ctx = mp.get_context("spawn")
    own_dir = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="helix-fleet-"))
    args = argparse.Namespace(pg_admin_url="", api_log_level=api_log_level, api_workers=None,
                              api_threads=api_threads)
    api = HelixApi("sqlite", workdir, args, ["bench/fleet-1", f"bench/fleet-{runners}"])
    memory = None
    out: dict[str, Any] = {"runners": runners}
    try:
        api.setup()
        api.start_with_threads(runners + 16)
        out["server"] = api.banner + (f"; {api.threads_note}" if api.threads_note else "")
        memory = TreeMemory(api.proc.pid)
        memory.phase_end("start")
        one = measure_latency(ctx, api, model="bench/fleet-1", runners=1, mode="long", samples=samples,
                              warmup=warmup, monitor=memory).summary()
        logger.info("  %s", fmt_summary(one))
        many = measure_latency(ctx, api, model=f"bench/fleet-{runners}", runners=runners, mode="long",
                               samples=samples, warmup=warmup, monitor=memory, idle_seconds=idle_seconds,
                               settle_seconds=settle_seconds).summary()
        logger.info("  %s", fmt_summary(many))
        memory.phase_end(f"{runners} runners")
        out.update(one=one, many=many)
    except Exception:
        logger.error("fleet run failed; API log tail:\n%s", api.log_tail())
        raise
    finally:
        if memory is not None:
            out["memory"] = memory.stop()
        api.stop()
        api.teardown()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    one_p50, many_p50 = out["one"].get("sent_p50_ms"), out["many"].get("sent_p50_ms")
    out["p50_ratio"] = many_p50 / one_p50 if one_p50 and many_p50 else None
    out["p50_ms"], out["p50_1_ms"] = many_p50, one_p50
    out["idle_cpu_pct"] = out["many"]["idle_cpu_pct"]
    out["rss_mb"] = out["memory"]["rss_sum_mb"]
    return out


def report(result: dict[str, Any]) -> str:
    """The figures beside the issue's targets."""
    n = result["runners"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    one, many = result["one"], result["many"]
    rows = [
        ("dispatch p50 ms, 1 runner waiting", f"{one.get('sent_p50_ms', float('nan')):.2f}", "", ""),
        ("dispatch p99 ms, 1 runner waiting", f"{one.get('sent_p99_ms', float('nan')):.2f}", "", ""),
        (f"dispatch p50 ms, {n} runners waiting", f"{many.get('sent_p50_ms', float('nan')):.2f}", "", ""),
        (f"dispatch p99 ms, {n} runners waiting", f"{many.get('sent_p99_ms', float('nan')):.2f}", "", ""),
        (f"p50 with {n} / p50 with 1", f"{result['p50_ratio'] or float('nan'):.2f}x",
         f"<= {TARGET_P50_RATIO}x", verdict((result["p50_ratio"] or 99) <= TARGET_P50_RATIO)),
        (f"idle API CPU % of a core, {n} runners waiting", f"{result['idle_cpu_pct']:.1f}",
         f"<= {TARGET_IDLE_CPU_PCT:g}", verdict(result["idle_cpu_pct"] <= TARGET_IDLE_CPU_PCT)),
        ("API RSS peak MB, master + workers", f"{result['rss_mb']:.0f}", f"<= {TARGET_RSS_MB:g}",
         verdict(result["rss_mb"] <= TARGET_RSS_MB)),
    ]
    lines = [f"Helix fleet benchmark: {n} runners long-polling one API node (SQLite)",
             f"server: {result.get('server', '?')}", ""]
    lines += [f"{name:<48} {value:>10}  {target:>9}  {ok}" for name, value, target, ok in rows]
    lost = one["lost"] + many["lost"]
    errors = one["errors"] + many["errors"]
    lines.append("")
    lines.append(f"problems: lost {lost}, errors {errors}" if lost or errors else "problems: none")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the fleet benchmark and print its report."""
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--runners", type=int, default=1000)
    p.add_argument("--samples", type=int, default=50, help="latency samples per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--idle-seconds", type=float, default=30.0,
                   help="how long the idle API CPU is measured: keep it at least the long-poll wait (30)")
    p.add_argument("--api-threads", type=int, default=None, help="helix serve --threads (default: helix's)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = measure(args.runners, samples=args.samples, warmup=args.warmup, idle_seconds=args.idle_seconds,
                     api_threads=args.api_threads)
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    logger.info("fleet benchmark took %.0f s", time.monotonic() - started)
    sys.exit(code)
