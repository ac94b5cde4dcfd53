"""Text runner benchmark: overhead beyond generate(), warm vs load-per-task, tokens/s with --max-parallel.

    python -m bench.text                      # the tiny Mistral, then SmolLM2-135M-Instruct (a real model)
    python -m bench.text --model PATH_OR_ID   # ... then this model too (hub id or local path)
    python -m bench.text --no-real            # the tiny Mistral alone (a minute or two)

The real model comes from PyPI and is converted once (runner.smollm) into ~/.cache/helix-runner/models;
it is measured with fewer runs (--real-runs, --real-burst), as each of its replies takes seconds on a CPU.

Everything runs on this machine over loopback: a real `helix serve` (SQLite) and a real `helix-runner
--backend mistral`, against a bare loop over the same model in this process.

- overhead: the median time a task spends in the runner (the API's claimed_at -> finished_at) beyond a
  bare `model.generate()` of the same 64 tokens; the client's end-to-end latency is shown beside it.
- warm vs load-per-task: a fresh process that loads the model and answers one task (the `echo | docker
  run` way) against the warm runner's end-to-end latency.
- tokens/s: generated tokens per second of wall time for a burst of tasks at --max-parallel 1, 4 and 8.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.helix_server import HelixApi
from bench.processes import ROOT, stop_process

logger = logging.getLogger("bench.text")

REPLY_TOKENS = 64
RUNNER_WAIT = 2  # the runners' long-poll seconds
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"  # the production database, as deployed
PROMPT = "Tell me a story about a dragon who learned to paint."
TARGETS = {"overhead": 5.0, "warm": 10.0, "parallel": 3.0}


class Cores:
    """With `--pin`: model work (bare loop, runner, load-per-task) on one core with one torch thread;
    the API and this process's clients on the others, as in production, where the API has its own
    machines and the model its own GPU. Without it, everything shares every core.
    """

    def __init__(self, pin: bool) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.model: set[int] | None = {cores[-1]} if pin and len(cores) >= 2 else None
        self.rest: set[int] | None = set(cores[:-1]) if self.model else None

    def describe(self) -> str:
        if self.model is None:
            return "unpinned: the model, the runner, the API and the clients share every core"
        return (f"pinned: model work on core {min(self.model)} (1 torch thread), the API and the clients on "
                f"core(s) {','.join(map(str, sorted(self.rest or ())))}")

    def model_env(self, env: dict[str, str]) -> dict[str, str]:
        return {**env, "OMP_NUM_THREADS": "1"} if self.model else env

    def model_preexec(self):
        model = self.model
        return (lambda: os.sched_setaffinity(0, model)) if model else None

    def pin_tree(self, pid: int) -> None:
        """Pin a process (the API's gunicorn master) and its children to the non-model cores."""
        if not self.rest:
            return
        import psutil

        parent = psutil.Process(pid)
        for proc in [parent, *parent.children(recursive=True)]:
            os.sched_setaffinity(proc.pid, self.rest)


CORES = Cores(False)


# The bare loop: the model in this process, no runner, no API.


def bare_generate_seconds(model_name: str, device: str, runs: int) -> tuple[list[float], int]:
    """Times of `model.generate()` for a 64-token greedy reply; and the prompt's token count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=_dtype(device)).to(device).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        tokenize=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(device) for k, v in ids.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    times = []
    threads = torch.get_num_threads()
    if CORES.model:  # the same core and thread count the runner gets
        os.sched_setaffinity(0, CORES.model)
        torch.set_num_threads(1)
    try:
        times = _generate_times(model, ids, pad, device, runs)
    finally:
        if CORES.model:
            os.sched_setaffinity(0, CORES.rest)
            torch.set_num_threads(threads)
    return times, int(ids["input_ids"].shape[1])


def _generate_times(model: Any, ids: dict[str, Any], pad: int, device: str, runs: int) -> list[float]:
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(runs + 2):  # two warm-ups
            _sync(device)
            started = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=REPLY_TOKENS, min_new_tokens=REPLY_TOKENS, do_sample=False,
                                 pad_token_id=pad)
            _sync(device)
            times.append(time.perf_counter() - started)
            assert out.shape[1] - ids["input_ids"].shape[1] == REPLY_TOKENS
    return times[2:]


def build_mid_mistral(path: Path) -> Path:
    """A random ~50M-parameter Mistral (6 layers, hidden 768) on the tiny tokenizer: a reply takes about as
    long on 2 CPU cores as a 7B model's on a GPU, so the runner's fixed costs are weighed against a
    realistic generation time. Its text is gibberish, like the tiny model's."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from runner.tiny.mistral import build_tiny_mistral

    if (path / "config.json").exists():
        return path
    tiny = build_tiny_mistral(path.parent / "tiny-mistral")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2688, num_hidden_layers=6,
                           num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _dtype(device: str):
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# The runner over HTTP.


class TextBench:
    """A Helix API (SQLite) offering `model`, and runner processes serving it."""

    def __init__(self, model: str, device: str, workdir: Path, clients: int = 16, pg_admin_url: str = "") -> None:
        self.model = model
        self.device = device
        self.workdir = workdir
        # Every client following an event stream holds an API thread: leave plenty for the runner's calls.
        threads = 2 * clients + 8
        args = argparse.Namespace(pg_admin_url=pg_admin_url, api_log_level="WARNING", api_workers=None,
                                  api_threads=threads)
        self.api = HelixApi("postgres" if pg_admin_url else "sqlite", workdir, args, [model])
        self.api.setup()
        self.api.start(threads)
        CORES.pin_tree(self.api.proc.pid)
        self.runner: subprocess.Popen | None = None

    def start_runner(self, max_parallel: int) -> None:
        """Start `helix-runner --backend mistral` and wait until it has loaded the model and is claiming."""
        self.stop_runner()
        env = dict(self.api.env)
        env["HELIX_GET_JOB_URL"] = (f"http://{self.api.host}:{self.api.port}/api/v1/worker/task"
                                    f"?mode=create&type=text&model_name={self.model}")
        env["HELIX_RUNNER_TOKEN"] = self.api.token
        log_path = self.workdir / f"runner-{max_parallel}.log"
        command = [sys.executable, "-m", "runner", "--backend", "mistral", "--max-parallel", str(max_parallel),
                   "--device", self.device, "--wait", str(RUNNER_WAIT), "--log-level", "INFO",
                   "--cache-dir", str(self.workdir / "runner-cache")]
        with open(log_path, "wb") as log:
            self.runner = subprocess.Popen(command, env=CORES.model_env(env), stdout=log, stderr=subprocess.STDOUT,
                                           cwd=ROOT, start_new_session=True, preexec_fn=CORES.model_preexec())
        deadline = time.monotonic() + 600
        while "claiming" not in log_path.read_text(errors="replace"):
            if self.runner.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"runner did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        time.sleep(0.3)  # let it reach its first long poll

    def stop_runner(self) -> None:
        if self.runner is not None:
            stop_process(self.runner)
            self.runner = None
            # The API still holds the stopped runner's long poll, and would hand it the next task (which would
            # wait out a lease): let the poll end first.
            time.sleep(RUNNER_WAIT + 1)

    def close(self) -> None:
        self.stop_runner()
        self.api.stop()
        self.api.teardown()

    def ask(self, message: str, seed: int = 0) -> tuple[float, int, dict[str, Any]]:
        """Create a session and wait for its reply over the event stream: (seconds, session id, reply)."""
        import requests

        params = {"max_new_tokens": REPLY_TOKENS, "seed": seed}
        headers = {"Authorization": f"Bearer {self.api.key}"}
        base = f"http://{self.api.host}:{self.api.port}/api/v1/sessions"
        with requests.Session() as http:
            started = time.perf_counter()
            response = http.post(base, headers=headers, timeout=60, json={
                "mode": "create", "type": "text", "model_name": self.model, "message": message, "params": params})
            response.raise_for_status()
            session_id = response.json()["id"]
            with http.get(f"{base}/{session_id}/events", headers=headers, params={"follow": "1"}, stream=True,
                          timeout=(5, 120)) as events:
                for line in events.iter_lines(chunk_size=None, decode_unicode=True):
                    if line and line.startswith("data:") and '"state"' in line:
                        state = json.loads(line[5:]).get("state")
                        if state in ("complete", "error", "cancelled"):
                            break
            elapsed = time.perf_counter() - started
            reply = http.get(f"{base}/{session_id}", headers=headers, timeout=30).json()["interactions"][-1]
        if reply["state"] != "complete":
            raise RuntimeError(f"session {session_id}: reply {reply['state']}: {reply.get('error')}")
        return elapsed, session_id, reply

    def runner_seconds(self, session_ids: list[int]) -> list[float]:
        """claimed_at -> finished_at of each session's task, from the API's database."""
        from sqlalchemy import bindparam, create_engine, text

        url = self.api.env.get("HELIX_DATABASE_URL") or f"sqlite:///{self.api.env['HELIX_DATA_DIR']}/helix.db"
        engine = create_engine(url)
        query = text("SELECT claimed_at, finished_at FROM tasks WHERE session_id IN :ids").bindparams(
            bindparam("ids", expanding=True))
        with engine.connect() as conn:
            rows = conn.execute(query, {"ids": session_ids}).fetchall()
        engine.dispose()
        return [(_when(done) - _when(claimed)).total_seconds() for claimed, done in rows]

    def burst(self, count: int) -> tuple[float, int]:
        """`count` sessions at once; (wall seconds until the last reply, generated tokens)."""
        results: list[Any] = [None] * count

        def one(index: int) -> None:
            results[index] = self.ask(f"{PROMPT} ({index})", seed=index)

        started = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        tokens = sum(r[2]["result"]["usage"]["completion_tokens"] if r[2].get("result") else REPLY_TOKENS
                     for r in results)
        return wall, tokens


def _when(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def load_per_task_seconds(model: str, device: str, runs: int) -> list[float]:
    """A fresh process per task: start Python, load the model, answer one chat, exit."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.text", "--one-task", model, "--device", device], check=True,
                       cwd=ROOT, capture_output=True, env=CORES.model_env(dict(os.environ)),
                       preexec_fn=CORES.model_preexec())
        times.append(time.perf_counter() - started)
    return times


def one_task(model: str, device: str) -> None:
    """Load the model with the runner's backend, answer one chat, and return (the process then exits)."""
    from runner.backends.mistral import MistralBackend
    from runner.config import RunnerConfig
    from runner.messages import Task

    class Quiet:
        files = None
        cancelled = False

        def token(self, text: str) -> None:
            pass

        def log(self, message: str, level: str = "info") -> None:
            pass

        def check(self) -> None:
            pass

    backend = MistralBackend(RunnerConfig("", "", "create", "text", model, device=device))
    backend.setup()
    task = Task(1, 1, 1, "create", "text", model, 1, {"messages": [{"role": "user", "content": PROMPT}]},
                {"max_new_tokens": REPLY_TOKENS})
    print(backend.predict(task, Quiet())["usage"])


# The report.


def measure(model: str, device: str, workdir: Path, runs: int, burst: int, pg_admin_url: str) -> dict[str, Any]:
    """All figures for one model."""
    logger.info("%s: bare generate() x%d", model, runs)
    bare, prompt_tokens = bare_generate_seconds(model, device, runs)
    bench = TextBench(model, device, workdir, clients=burst, pg_admin_url=pg_admin_url)
    try:
        bench.start_runner(1)
        bench.ask("warm up")
        logger.info("%s: %d tasks through the API and a warm runner", model, runs)
        asked = [bench.ask(PROMPT) for _ in range(runs)]
        e2e = [elapsed for elapsed, _, _ in asked]
        in_runner = bench.runner_seconds([session_id for _, session_id, _ in asked])
        short = [r for _, _, r in asked if r["result"]["usage"]["completion_tokens"] != REPLY_TOKENS]
        rates = {}
        for parallel in (1, 4, 8):
            logger.info("%s: a burst of %d tasks at --max-parallel %d", model, burst, parallel)
            if parallel > 1:
                bench.start_runner(parallel)
            bench.burst(parallel)  # warm-up
            wall, tokens = bench.burst(burst)
            rates[parallel] = tokens / wall
    finally:
        bench.close()
    logger.info("%s: load-per-task x3", model)
    cold = load_per_task_seconds(model, device, 3)
    bare_ms = statistics.median(bare) * 1000
    return {
        "model": model, "device": device, "prompt_tokens": prompt_tokens, "bare_ms": bare_ms,
        "runner_ms": statistics.median(in_runner) * 1000, "e2e_ms": statistics.median(e2e) * 1000,
        "cold_ms": statistics.median(cold) * 1000, "rates": rates, "short_replies": len(short),
    }


def table(results: list[dict[str, Any]]) -> str:
    """The figures against their targets, one block per model."""
    lines = []
    for r in results:
        runner_over = r["runner_ms"] - r["bare_ms"]
        e2e_over = r["e2e_ms"] - r["bare_ms"]
        warm = r["cold_ms"] / r["e2e_ms"]
        speedup = r["rates"][8] / r["rates"][1]
        over_pct = 100 * runner_over / r["bare_ms"]

        def verdict(ok: bool) -> str:
            return "meets" if ok else "MISSES"

        lines += [
            f"model {r['model']} on {r['device']} ({r['prompt_tokens']}-token prompt, {REPLY_TOKENS}-token reply)",
            f"  {'figure':<44}{'value':>22}  target",
            f"  {'bare model.generate(), median':<44}{r['bare_ms']:>19.1f} ms",
            f"  {'runner overhead (claimed->finished - bare)':<44}{runner_over:>10.1f} ms {over_pct:>6.1f} %"
            f"  <= {TARGETS['overhead']:.0f}%: {verdict(over_pct <= TARGETS['overhead'])}",
            f"  {'end-to-end via API (create->complete) - bare':<44}{e2e_over:>10.1f} ms "
            f"{100 * e2e_over / r['bare_ms']:>6.1f} %  (for reference)",
            f"  {'load-per-task process, median':<44}{r['cold_ms']:>19.1f} ms",
            f"  {'warm runner vs load-per-task':<44}{warm:>20.1f} x  >= {TARGETS['warm']:.0f}x: "
            f"{verdict(warm >= TARGETS['warm'])}",
        ]
        for parallel, rate in r["rates"].items():
            lines.append(f"  {f'tokens/s at --max-parallel {parallel}':<44}{rate:>18.1f} t/s")
        lines.append(f"  {'8-parallel vs 1-parallel':<44}{speedup:>20.2f} x  >= {TARGETS['parallel']:.0f}x: "
                     f"{verdict(speedup >= TARGETS['parallel'])}")
        if r["short_replies"]:
            lines.append(f"  note: {r['short_replies']} replies ended before {REPLY_TOKENS} tokens (end of sequence)")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.text", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a hub id or local path to measure after the tiny model")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=15, help="tasks per latency figure (medians)")
    parser.add_argument("--burst", type=int, default=16, help="tasks per tokens/s figure")
    parser.add_argument("--skip-tiny", action="store_true", help="do not measure the tiny model")
    parser.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                        help="measure SmolLM2-135M-Instruct too (fetched and converted once) [default: on]")
    parser.add_argument("--real-runs", type=int, default=5, help="tasks per latency figure of the real model")
    parser.add_argument("--real-burst", type=int, default=8, help="tasks per tokens/s figure of the real model")
    parser.add_argument("--mid", action="store_true",
                        help="also measure a random ~50M-parameter Mistral whose replies take as long on 2 CPU "
                             "cores as a 7B model's on a GPU")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--pg-admin-url", default=os.environ.get("HELIX_BENCH_PG", DEFAULT_PG),
                        help="a PostgreSQL server for the API's database ('' for SQLite) [%(default)s]")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU only: model work on its own core, the API and clients on the others "
                             "(on a GPU the model needs no core of its own) [default: on]")
    parser.add_argument("--one-task", metavar="MODEL", help=argparse.SUPPRESS)  # the load-per-task process
    args = parser.parse_args(argv)
    if args.one_task:
        one_task(args.one_task, args.device)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    global CORES
    CORES = Cores(args.pin and device == "cpu")
    if CORES.rest:
        os.sched_setaffinity(0, CORES.rest)
    workdir = Path(tempfile.mkdtemp(prefix="helix-bench-text-"))
    models = []
    if not args.skip_tiny:
        from runner.tiny.mistral import build_tiny_mistral

        models.append(str(build_tiny_mistral(workdir / "tiny-mistral")))
    if args.mid:
        models.append(str(build_mid_mistral(workdir / "mid-mistral")))
    if args.model:
        models.append(args.model)
    results = [measure(model, device, workdir / f"m{index}", args.runs, args.burst, args.pg_admin_url)
               for index, model in enumerate(models)]
    if args.real:
        from runner import smollm
        from runner.config import default_cache_dir

        # By its directory, so no hub settings reach the other models' processes.
        path = smollm.install(Path(default_cache_dir()) / "models" / "hub")
        real = measure(str(path), device, workdir / "real", args.real_runs, args.real_burst, args.pg_admin_url)
        results.append({**real, "model": smollm.NAME})
    print()
    gpu = f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    print(f"bench.text on {os.cpu_count()} CPU cores{gpu}; API on {'PostgreSQL' if args.pg_admin_url else 'SQLite'}; "
          f"{CORES.describe()}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
