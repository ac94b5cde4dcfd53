"""Replicas benchmark: several `helix serve` on one PostgreSQL, the creator on one and the runners on another.

    .venv/bin/python -m bench.replicas                 # 3 replicas, 10 runners (about 1 minute)
    .venv/bin/python -m bench.replicas --replicas 2 --runners 1 --samples 100

As on separate machines, each replica is its own `helix serve` (helix's defaults) on its own port,
all on one throwaway PostgreSQL database. It measures dispatch latency, create sent -> claim
received, one task at a time as bench.dispatch's long-poll rows do:

- single replica: the creator and the waiting runners on replica 0;
- across replicas: the creator on replica 0, the runners long-polling replica 1. The runners wake
  only by PostgreSQL NOTIFY relayed to replica 1 (the re-check timer is set to 60 s, beyond the
  30 s long-poll, so a wake-up that did not travel would show as a lost sample);
- then whether tokens a runner posts to replica 1 reach a follower of the session's event stream on
  the last replica, and how long after the post (without HELIX_BUS_URL: at the 0.25 s flush).

`measure(...)` returns the figures as a dict, so an aggregate report can import it; run alone it
prints them beside the issue's target (across <= 2x single). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.dispatch import DEFAULT_PG_ADMIN_URL  # noqa: E402
from bench.helix_clients import Http  # noqa: E402
from bench.helix_load import measure_latency  # noqa: E402
from bench.helix_server import HelixApi  # noqa: E402
from bench.measures import fmt_summary  # noqa: E402

logger = logging.getLogger("bench.replicas")

TARGET_RATIO = 2.0
QUICK = {"samples": 20, "warmup": 3}  # what bench.all passes with --quick
RECHECK_SECONDS = "60"  # beyond the long-poll: only a relayed wake-up can bring a task in time


class _Split:
    """What measure_latency needs of an API, with the creator on one replica and the runners on another."""

    def __init__(self, creator: HelixApi, runners: HelixApi) -> None:
        self.creator, self.runners = creator, runners

    def runner_cfg(self, **extra: Any) -> dict[str, Any]:
        return self.runners.runner_cfg(**extra)

    def user_client(self) -> Http:
        return self.creator.user_client()


def _replica(first: HelixApi, index: int, workdir: Path, args: argparse.Namespace) -> HelixApi:
    """Another `helix serve` on the first one's database, user and runner token."""
    api = HelixApi("postgres", workdir / f"replica-{index}", args, [])
    api.env = {**first.env, "HELIX_DATA_DIR": str(api.workdir / "data")}
    api.key, api.token = first.key, first.token
    return api


def _tokens_cross(creator: HelixApi, runner: HelixApi, follower: HelixApi, model: str) -> dict[str, Any]:
    """Tokens a runner posts to one replica, read live by a follower of the session on another."""
    import requests

    text = "tokens across replicas"
    client = creator.user_client()
    status, session = client.request("POST", "/api/v1/sessions", {"model_name": model, "message": "follow me"})
    client.close()
    if status != 201:
        return {"tokens_cross": False, "why": f"create answered {status}"}
    runner_http = Http(runner.host, runner.port, runner.token, runner_name="bench-follow")
    status, claimed = runner_http.request(
        "GET", f"/api/v1/worker/task?mode=create&type=text&model_name={model}&wait=10")
    if status != 200:
        return {"tokens_cross": False, "why": f"claim answered {status}"}
    seen: list[str] = []
    arrived = threading.Event()

    def follow() -> None:
        url = f"http://{follower.host}:{follower.port}/api/v1/sessions/{session['id']}/events"
        with requests.get(url, headers={"Authorization": f"Bearer {follower.key}"}, stream=True,
                          timeout=(5, 15)) as response:
            for line in response.iter_lines(decode_unicode=True):
                if line and line.startswith("data:") and '"token"' in line:
                    seen.append(json.loads(line[5:])["text"])
                    if "".join(seen) == text:
                        arrived.set()
                        return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(0.5)  # the follower is attached before the tokens come
    task, token = claimed["task"], claimed["lease"]["token"]
    posted = time.monotonic()
    words = text.split(" ")
    events = [{"seq": i + 1, "kind": "token", "text": w + (" " if i < len(words) - 1 else "")}
              for i, w in enumerate(words)]
    runner_http.request("POST", f"/api/v1/worker/task/{task['id']}/events", {"lease_token": token, "events": events})
    ok = arrived.wait(10)
    delay_ms = (time.monotonic() - posted) * 1000
    runner_http.request("POST", f"/api/v1/worker/task/{task['id']}/complete",
                        {"lease_token": token, "result": {"text": text}})
    runner_http.close()
    return {"tokens_cross": ok, "tokens_cross_ms": round(delay_ms, 1) if ok else None}


def measure(replicas: int = 3, runners: int = 10, *, samples: int = 50, warmup: int = 5,
            pg_admin_url: str = DEFAULT_PG_ADMIN_URL, api_log_level: str = "WARNING",
            workdir: Path | None = None) -> dict[str, Any]:
    """Dispatch p50/p99 with creator and runners on one replica, and on two different ones."""
    if replicas < 2:
        raise ValueError("replicas: at least 2")
    ctx = mp.get_context("spawn")
    own_dir = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="helix-replicas-"))
    args = argparse.Namespace(pg_admin_url=pg_admin_url, api_log_level=api_log_level, api_workers=None,
                              api_threads=None)
    first = HelixApi("postgres", workdir / "replica-0", args, ["bench/same", "bench/across"])
    first.env["HELIX_RECHECK_SECONDS"] = RECHECK_SECONDS
    apis = [first]
    out: dict[str, Any] = {"replicas": replicas, "runners": runners}
    try:
        first.setup()
        apis += [_replica(first, i, workdir, args) for i in range(1, replicas)]
        for api in apis:
            api.start()
        out["servers"] = [api.banner for api in apis]
        same = measure_latency(ctx, first, model="bench/same", runners=runners, mode="long",
                               samples=samples, warmup=warmup).summary()
        logger.info("  one replica: %s", fmt_summary(same))
        across = measure_latency(ctx, _Split(first, apis[1]), model="bench/across", runners=runners,
                                 mode="long", samples=samples, warmup=warmup).summary()
        logger.info("  across replicas: %s", fmt_summary(across))
        out.update(same=same, across=across)
        # Tokens: the runner posts to replica 1, a follower reads on the last replica.
        out.update(_tokens_cross(first, apis[1], apis[-1], "bench/across"))
        logger.info("  tokens across replicas: %s", {k: out.get(k) for k in ("tokens_cross", "tokens_cross_ms")})
    except Exception:
        for api in apis:
            logger.error("replica on port %s, log tail:\n%s", api.port, api.log_tail())
        raise
    finally:
        for api in apis:
            api.stop()
        first.teardown()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    one, two = out["same"].get("sent_p50_ms"), out["across"].get("sent_p50_ms")
    out["p50_ratio"] = two / one if one and two else None
    out["single_p50_ms"], out["p50_ms"] = one, two  # the names bench.all reads
    return out


def report(result: dict[str, Any]) -> str:
    """The figures beside the issue's target."""
    same, across, ratio = result["same"], result["across"], result["p50_ratio"]
    nan = float("nan")
    lines = [f"Helix replicas benchmark: {result['replicas']} `helix serve` on one PostgreSQL, "
             f"{result['runners']} runners waiting", *(f"server: {s}" for s in result.get("servers", [])), ""]
    rows = [("dispatch p50 ms, creator and runners on one replica", f"{same.get('sent_p50_ms', nan):.2f}", ""),
            ("dispatch p99 ms, creator and runners on one replica", f"{same.get('sent_p99_ms', nan):.2f}", ""),
            ("dispatch p50 ms, creator and runners on different replicas",
             f"{across.get('sent_p50_ms', nan):.2f}", ""),
            ("dispatch p99 ms, creator and runners on different replicas",
             f"{across.get('sent_p99_ms', nan):.2f}", ""),
            ("p50 across / p50 on one", f"{ratio or nan:.2f}x",
             f"<= {TARGET_RATIO:g}x  {'PASS' if ratio and ratio <= TARGET_RATIO else 'MISS'}")]
    rows.append(("tokens posted to one replica reach a live follower on another",
                 "yes" if result.get("tokens_cross") else "NO",
                 f"{result.get('tokens_cross_ms')} ms after the post" if result.get("tokens_cross") else ""))
    lines += [f"{name:<60} {value:>9}  {target}" for name, value, target in rows]
    lost, errors = same["lost"] + across["lost"], same["errors"] + across["errors"]
    lines += ["", f"problems: lost {lost}, errors {errors}" if lost or errors else "problems: none"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the replicas benchmark and print its report."""
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--runners", type=int, default=10, help="runners waiting (on one replica)")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    result = measure(args.replicas, args.runners, samples=args.samples, warmup=args.warmup,
                     pg_admin_url=args.pg_admin_url)
    print(report(result), flush=True)
    logger.info("replicas benchmark took %.0f s", time.monotonic() - started)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if not (result["same"]["lost"] or result["across"]["lost"]) else 1


if __name__ == "__main__":
    sys.exit(main())
