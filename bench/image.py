"""Image runner benchmark: the runner's overhead per image, warm runner vs load-per-task, images/s.

    python -m bench.image                       # the tiny SDXL pipeline, built offline into a temp dir
    python -m bench.image --model PATH_OR_ID    # a real pipeline (add --device cuda on a GPU)

Everything goes through a real `helix serve` (SQLite) and a real `helix-runner --backend sdxl` over HTTP.
The warm runner is the real runner loop with two clocks added (bench.image's `--runner-child`): when a
claim reply arrived and when the complete call was acknowledged, and how long the pipeline call took.

- bare pipeline call: `pipe(prompt, num_inference_steps=4, ...)` in this process, nothing else.
- runner task time: claim reply received -> complete acknowledged, inside the runner process: setting up the
  task, the pipeline call, progress events, PNG encoding, the upload, the result.
- overhead per image = median runner task time - median bare pipeline call (target <= 5% of the latter).
- warm vs load-per-task: create -> reply complete seen by the user, for the warm runner and for a fresh
  `helix-runner --max-tasks 1` started with each task (what a container per job costs); target >= 10x.
- images/s: sessions created back to back, first create -> last reply complete, one warm runner.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.helix_clients import Http
from bench.helix_server import HelixApi
from bench.processes import ROOT, stop_process

logger = logging.getLogger("bench.image")

TARGET_OVERHEAD = 0.05  # of the bare pipeline call
TARGET_WARM_RATIO = 10.0
PROMPT = "a red fox in the snow, cinematic"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="SDXL pipeline hub id or path (default: the tiny pipeline, built offline)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the pipeline's native)")
    parser.add_argument("--tasks", type=int, default=30, help="timed tasks through the warm runner")
    parser.add_argument("--bare", type=int, default=10, help="bare calls timed in the runner process before its tasks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cold", type=int, default=3, help="tasks each run by a freshly started runner")
    parser.add_argument("--throughput", type=int, default=30, help="sessions created back to back for images/s")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in every process (OMP_NUM_THREADS); 0 leaves torch's default. "
                             "On a shared machine more threads than idle cores make each call many times slower")
    parser.add_argument("--workdir", help="where the tiny pipeline, database and logs go (default: a temp dir)")
    parser.add_argument("--api-log-level", default="WARNING")
    parser.add_argument("--runner-child", nargs=2, metavar=("CONFIG_JSON", "RECORDS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# The warm runner: the real loop, client and backend, with clocks.


def runner_child(config_json: str, records_path: str) -> None:
    """Run the real runner with a client and backend that note when each task's parts happened."""
    from runner.backends.sdxl import SDXLBackend
    from runner.client import ApiClient
    from runner.config import RunnerConfig
    from runner.loop import Runner

    cfg = json.loads(config_json)
    records = open(records_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    class TimedClient(ApiClient):
        def claim(self, *args: Any, **kwargs: Any) -> Any:
            claim = super().claim(*args, **kwargs)
            if claim is not None:
                records.write(json.dumps({"task": claim.task.id, "claimed": time.monotonic()}) + "\n")
            return claim

        def complete(self, task_id: int, *args: Any, **kwargs: Any) -> Any:
            reply = super().complete(task_id, *args, **kwargs)
            records.write(json.dumps({"task": task_id, "completed": time.monotonic()}) + "\n")
            return reply

    class TimedBackend(SDXLBackend):
        def setup(self) -> None:
            super().setup()
            # The same calls as the bench's bare ones, in this process, before any task: no runner around them.
            for n in range(cfg["warmup"] + cfg["bare"]):
                started = time.monotonic()
                bare_call(self.pipe, cfg["side"], cfg["steps"])
                if n >= cfg["warmup"]:
                    records.write(json.dumps({"task": 0, "bare": time.monotonic() - started}) + "\n")

        def predict(self, task: Any, report: Any) -> dict[str, Any]:
            self._task_id = task.id
            records.write(json.dumps({"task": task.id, "predict_start": time.monotonic()}) + "\n")
            result = super().predict(task, report)
            records.write(json.dumps({"task": task.id, "predict_end": time.monotonic()}) + "\n")
            return result

        def generate(self, **kwargs: Any) -> list[Any]:
            started = time.monotonic()
            images = super().generate(**kwargs)
            records.write(json.dumps({"task": self._task_id, "pipeline": time.monotonic() - started,
                                      "generated": time.monotonic()}) + "\n")
            return images

    config = RunnerConfig(api_url=cfg["api_url"], token=cfg["token"], mode="create", type="image",
                          model_name=cfg["model"], backend="sdxl", runner_name="bench-warm", wait=20,
                          idle_sleep=0.0, device=cfg["device"], cache_dir=cfg["cache_dir"])
    client = TimedClient(config.api_url, config.token, config.runner_name, timeout=config.request_timeout,
                         retry=config.retry)
    runner = Runner(config, TimedBackend(config), client)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    runner.run()


# The measurements.


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_pipeline(model: str, device: str) -> tuple[Any, list[float]]:
    """The pipeline loaded three times (the load times), the last one kept."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    loads = []
    for _ in range(3):
        started = time.monotonic()
        pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
        loads.append(time.monotonic() - started)
    pipe.set_progress_bar_config(disable=True)
    return pipe, loads


def bare_call(pipe: Any, side: int, steps: int) -> None:
    """The pipeline call a task makes, and nothing else."""
    import torch

    with torch.inference_mode():
        pipe(prompt=PROMPT, width=side, height=side, num_inference_steps=steps, guidance_scale=5.0,
             generator=[torch.Generator("cpu").manual_seed(1)], callback_on_step_end=lambda p, s, t, k: k)


class User:
    """The user side: create image sessions and wait for their replies."""

    def __init__(self, api: HelixApi, model: str, params: dict[str, Any]) -> None:
        self.http = Http(api.host, api.port, api.key)
        self.model, self.params = model, params

    def create(self) -> tuple[int, float]:
        sent = time.monotonic()
        status, body = self.http.request("POST", "/api/v1/sessions", {
            "mode": "create", "type": "image", "model_name": self.model, "message": PROMPT, "params": self.params})
        if status != 201:
            raise RuntimeError(f"create: {status} {body}")
        return body["id"], sent

    def wait(self, session_id: int, timeout: float = 600.0, interval: float = 0.01, quiet: float = 0.0) -> float:
        """Poll until the reply is complete; when it was seen.

        No poll in the first `quiet` seconds: each GET costs the API CPU that the pipeline would miss.
        """
        deadline = time.monotonic() + timeout
        time.sleep(quiet)
        while time.monotonic() < deadline:
            status, body = self.http.request("GET", f"/api/v1/sessions/{session_id}")
            state = body["interactions"][-1]["state"] if status == 200 else None
            if state == "complete":
                return time.monotonic()
            if state in ("error", "cancelled"):
                raise RuntimeError(f"session {session_id}: {body['interactions'][-1]}")
            time.sleep(interval)
        raise RuntimeError(f"session {session_id} not complete after {timeout}s")


def read_records(path: Path) -> tuple[list[float], dict[int, dict[str, float]]]:
    """The runner's own bare calls, and per task its clocks."""
    bare: list[float] = []
    tasks: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        task = row.pop("task")
        if task == 0:
            bare.append(row["bare"])
        else:
            tasks.setdefault(task, {}).update(row)
    return bare, tasks


def runner_env(api: HelixApi, model: str, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HELIX_GET_JOB_URL"] = (f"http://{api.host}:{api.port}/api/v1/worker/task?mode=create&type=image"
                                f"&model_name={quote(model, safe='/')}")
    env["HELIX_RUNNER_TOKEN"] = api.token
    env["HELIX_RUNNER_CACHE"] = str(cache)
    return env


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = args.model
    if not model:
        from runner.tiny.sdxl import build_tiny_sdxl

        model = str(build_tiny_sdxl(workdir / "tiny-sdxl"))
    results: dict[str, Any] = {"model": model}
    pipe, loads = load_pipeline(model, args.device)
    side = args.size or pipe.default_sample_size * pipe.vae_scale_factor
    results.update(load_s=loads, side=side)
    for _ in range(args.warmup):
        bare_call(pipe, side, args.steps)
    params = {"num_inference_steps": args.steps, "seed": 1, "width": side, "height": side, "guidance_scale": 5.0}

    api_args = argparse.Namespace(api_log_level=args.api_log_level, api_workers=None, api_threads=None,
                                  pg_admin_url=None)
    api = HelixApi("sqlite", workdir, api_args, [])
    api.env["HELIX_MODELS"] = f"image:{model}"
    api.setup()
    api.start()
    results["api"] = api.banner
    user = User(api, model, params)
    records = workdir / "runner-records.jsonl"
    child = None
    try:
        env = runner_env(api, model, workdir / "cache")
        config = {"api_url": f"http://{api.host}:{api.port}", "token": api.token, "model": model,
                  "device": args.device, "cache_dir": str(workdir / "cache"), "side": side, "steps": args.steps,
                  "warmup": args.warmup, "bare": args.bare}
        log = open(workdir / "runner-warm.log", "wb")  # noqa: SIM115 - handed to the child
        child = subprocess.Popen([sys.executable, "-m", "bench.image", "--runner-child", json.dumps(config),
                                  str(records)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 start_new_session=True)
        log.close()

        logger.info("warm runner: %d warm-up + %d timed tasks, each after a bare call here (same load on both)",
                    args.warmup, args.tasks)
        bare, e2e = [], []
        for n in range(args.warmup + args.tasks):
            started = time.monotonic()
            bare_call(pipe, side, args.steps)
            bare_s = time.monotonic() - started
            session_id, sent = user.create()
            done = user.wait(session_id, timeout=600, quiet=0.9 * min(bare or [bare_s]))
            if n >= args.warmup:
                bare.append(bare_s)
                e2e.append(done - sent)
        runner_bare, tasks = read_records(records)
        timed = [t for _, t in sorted(tasks.items())[args.warmup:] if {"claimed", "completed", "pipeline"} <= set(t)]
        results.update(bare_s=bare, runner_bare_s=runner_bare, warm_e2e_s=e2e,
                       task_s=[t["completed"] - t["claimed"] for t in timed],
                       pipeline_in_task_s=[t["pipeline"] for t in timed],
                       # claim -> predict(); after the pipeline call -> predict() returns; -> complete acknowledged
                       before_s=[t["predict_start"] - t["claimed"] for t in timed],
                       upload_s=[t["predict_end"] - t["generated"] for t in timed],
                       finish_s=[t["completed"] - t["predict_end"] for t in timed])

        logger.info("throughput: %d sessions created back to back", args.throughput)
        first = time.monotonic()
        created = [user.create()[0] for _ in range(args.throughput)]
        last = max(user.wait(session_id, timeout=600, interval=0.05) for session_id in created)
        results["images_per_s"] = args.throughput / (last - first)
    finally:
        del pipe
        if child is not None:
            stop_process(child)

    try:
        logger.info("load per task: %d tasks, each on a freshly started runner", args.cold)
        cold = []
        for n in range(args.cold):
            log = open(workdir / f"runner-cold-{n}.log", "wb")  # noqa: SIM115 - handed to the child
            session_id, sent = user.create()
            proc = subprocess.Popen([sys.executable, "-m", "runner", "--backend", "sdxl", "--device", args.device,
                                     "--max-tasks", "1", "--wait", "20", "--runner-name", f"bench-cold-{n}"],
                                    env=runner_env(api, model, workdir / "cache"), stdout=log,
                                    stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
            log.close()
            try:
                cold.append(user.wait(session_id, timeout=600, interval=0.05) - sent)
                proc.wait(timeout=60)
            finally:
                stop_process(proc)
        results["cold_e2e_s"] = cold
    finally:
        api.stop()
        api.teardown()
    return results


# The report.


def report(results: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> str:
    bare = median(results["bare_s"])
    task = median(results["task_s"])
    in_task = median(results["pipeline_in_task_s"])
    runner_bare = median(results["runner_bare_s"])
    around = median([t - p for t, p in zip(results["task_s"], results["pipeline_in_task_s"], strict=True)])
    overhead = task - bare
    warm, cold = median(results["warm_e2e_s"]), median(results["cold_e2e_s"])
    ratio = cold / warm
    ms = 1000.0

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    rows = [
        ["metric", "value", "target", "verdict"],
        [f"bare pipeline call ({args.steps} steps, {results['side']}px), median", f"{bare * ms:.1f} ms", "", ""],
        ["runner task time (claim reply -> complete acknowledged), median", f"{task * ms:.1f} ms", "", ""],
        ["runner overhead per image (task time - bare call), median", f"{overhead * ms:.1f} ms ({overhead / bare:.1%})",
         f"<= {TARGET_OVERHEAD:.0%}", verdict(overhead <= TARGET_OVERHEAD * bare)],
        ["  outside the pipeline call (task time - its own call), median",
         f"{around * ms:.1f} ms ({around / bare:.1%})", "", ""],
        ["    claim reply -> predict() starts, median", f"{median(results['before_s']) * ms:.1f} ms", "", ""],
        ["    pipeline call returns -> PNG saved and uploaded, median", f"{median(results['upload_s']) * ms:.1f} ms",
         "", ""],
        ["    predict() returns -> events flushed, complete acknowledged, median",
         f"{median(results['finish_s']) * ms:.1f} ms", "", ""],
        ["  pipeline call inside a task, median", f"{in_task * ms:.1f} ms", "", ""],
        ["  bare call in the runner process before any task, median", f"{runner_bare * ms:.1f} ms", "", ""],
        ["warm runner: create -> image ready (user's view), median", f"{warm * ms:.1f} ms", "", ""],
        ["load per task (a fresh runner per task): create -> image ready, median", f"{cold * ms:.0f} ms", "", ""],
        ["warm vs load-per-task", f"{ratio:.1f}x", f">= {TARGET_WARM_RATIO:.0f}x", verdict(ratio >= TARGET_WARM_RATIO)],
        ["  pipeline load alone (from_pretrained), median", f"{median(results['load_s']) * ms:.0f} ms", "", ""],
        [f"images/s (warm runner, {args.throughput} sessions back to back)", f"{results['images_per_s']:.2f}", "", ""],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = [
        f"$ python -m bench.image {shlex.join(argv)}".rstrip(),
        f"model: {results['model']}  device: {args.device}  torch threads: {args.threads or 'default'}  "
        f"tasks: {args.tasks} timed (+{args.warmup} warm-up), each after a bare call; fresh runners: {args.cold}",
        f"machine: {os.cpu_count()} CPUs, python {platform.python_version()}, load average "
        f"{' '.join(f'{x:.2f}' for x in results['loadavg'])} at start, "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end",
        f"api: {results.get('api') or 'helix serve'}",
        "",
    ]
    return "\n".join(head + lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.runner_child:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        runner_child(*args.runner_child)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the runner processes inherit it
        import torch

        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="helix-bench-image-"))
    workdir.mkdir(parents=True, exist_ok=True)
    loadavg = list(os.getloadavg())
    results = run(args, workdir)
    results["loadavg"] = loadavg
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    logger.info("logs and results.json in %s", workdir)
    print(report(results, args, argv))


if __name__ == "__main__":
    main()
