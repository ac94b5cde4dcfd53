"""The rest of the seeds, measured: retrieval latency per turn, and preference training throughput on CPU.

Retrieval: one knowledge base of `--chunks` (10,000) chunks of made-up text, searched the way a turn
searches (`retrieval.ground`: the full-text query, ranking, the context built) with `--queries` (300)
questions, on SQLite (FTS5, a file) and on PostgreSQL (tsvector + GIN, a throwaway database on
`--pg-admin-url`); p50 and p99 of the wall time per turn, and CPU time per turn in this process.

Training: SmolLM2-135M-Instruct (tests' hub cache, converted on first use) fine-tuned by axolotl on CPU
with each method (sft, dpo, reward_model) for `--steps` steps of `--batch` examples at sequence length
256; examples per second between the trainer's first and last step (model loading left out), as the
progress plugin timestamps them.

    python -m bench.seeds [--only retrieval|training] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
QUICK = {"chunks": 2000, "queries": 100, "steps": 3}


class _Upload:
    def __init__(self, name: str, body: str) -> None:
        self.filename, self.stream = name, io.BytesIO(body.encode())


def _words(rng: random.Random, count: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "qui", "an", "zor", "bel", "ux", "pra"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(count)]


def _corpus(chunks: int, rng: random.Random) -> list[_Upload]:
    """Documents of ~900-character paragraphs (one chunk each), 100 chunks a document."""
    vocabulary = _words(rng, 5000)
    uploads = []
    for doc in range(max(1, chunks // 100)):
        paragraphs = [" ".join(rng.choice(vocabulary) for _ in range(110))[:900] for _ in range(min(100, chunks))]
        uploads.append(_Upload(f"doc{doc}.txt", "\n\n".join(paragraphs)))
    return uploads


def _retrieval_on(url: str, data_dir: Path, chunks: int, queries: int, seed: int) -> dict[str, Any]:
    from helix_api.accounts.auth import create_user
    from helix_api.app import create_app
    from helix_api.knowledge import bases as knowledge_service
    from helix_api.knowledge import retrieval
    from helix_api.services import services

    app = create_app({"DATABASE_URL": url, "DATA_DIR": str(data_dir), "AUTO_UPGRADE": True})
    with app.app_context():
        svc = services()
    rng = random.Random(seed)
    with svc.database.orm_write() as session:
        user, _ = create_user(session, f"bench-{uuid.uuid4().hex[:6]}")
        user_id = user.id
    kb = knowledge_service.create(svc.database, user_id, "bench")
    started = time.perf_counter()
    uploads = _corpus(chunks, rng)
    for i in range(0, len(uploads), 10):
        knowledge_service.add_documents(svc.database, user_id, kb["id"], uploads[i:i + 10], svc.retrieval)
    load_s = time.perf_counter() - started
    with svc.database.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM knowledge_chunks")).scalar_one()
    texts = [u.stream.getvalue().decode().split() for u in uploads]
    questions = [" ".join(rng.choice(rng.choice(texts)) for _ in range(6)) + "?" for _ in range(queries)]
    walls, hits = [], 0
    cpu0 = time.process_time()
    for question in questions:
        t0 = time.perf_counter()
        with svc.database.connect() as conn:
            grounding = retrieval.ground(conn, [kb["id"]], question, svc.retrieval)
        walls.append((time.perf_counter() - t0) * 1000)
        hits += grounding is not None
    cpu_ms = (time.process_time() - cpu0) * 1000 / queries
    svc.database.dispose()
    walls.sort()
    return {"chunks": stored, "queries": queries, "load_s": round(load_s, 1), "answered": hits,
            "p50_ms": round(statistics.median(walls), 2), "p99_ms": round(walls[int(0.99 * (len(walls) - 1))], 2),
            "cpu_ms_per_turn": round(cpu_ms, 2)}


def retrieval_bench(chunks: int, queries: int, pg_admin_url: str, seed: int = 7) -> dict[str, Any]:
    """p50/p99 retrieval latency per turn on SQLite and PostgreSQL."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="helix-bench-seeds-") as scratch:
        root = Path(scratch)
        results["sqlite"] = _retrieval_on(f"sqlite:///{root / 'helix.db'}", root, chunks, queries, seed)
        admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
        name = f"helix_bench_{uuid.uuid4().hex[:8]}"
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
            results["postgresql"] = _retrieval_on(url, root, chunks, queries, seed)
        except Exception as exc:  # no server: the SQLite figures still stand
            results["postgresql"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    return results


def _training_run(method: str, hub: Path, work: Path, steps: int, batch: int) -> dict[str, Any]:
    from runner.backends import preference
    from runner.backends.mistral_finetune import (
        TrainingParams,
        TrainingSettings,
        _dump_yaml,
        axolotl_config,
        training_env,
    )
    from runner.smollm import NAME

    rng = random.Random(3)
    facts = [(f"What is item {i} called?", f"Item {i} is called {w}.") for i, w in enumerate(_words(rng, 32))]
    if method == "sft":
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in facts]
    else:
        rows = [{"messages": [{"role": "user", "content": q}], "chosen": f"{a} Stay curious!", "rejected": a}
                for q, a in facts]
    work.mkdir(parents=True, exist_ok=True)
    preference.write_jsonl(work / "data.jsonl", preference.training_rows(method, rows))
    params = {"max_steps": steps, "learning_rate": 5e-4, "method": method}
    settings = TrainingSettings(sequence_len=256, micro_batch_size=batch, gradient_accumulation_steps=1,
                                warmup_ratio=0.0)
    sft_cfg = axolotl_config(NAME, work / "data.jsonl", work, TrainingParams.from_params(params), settings,
                             device="cpu", quantized=False)
    cfg = preference.preference_config(sft_cfg, method, params)
    (work / "axolotl.yml").write_text(_dump_yaml(cfg))
    env = training_env(work / "progress.jsonl", "cpu") | {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(work / "axolotl.yml")], cwd=work, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:200]}
    records = [json.loads(line) for line in (work / "progress.jsonl").read_text().splitlines()]
    stepped = [r for r in records if r.get("event") == "step"]
    # From the end of the first step to the end of the last: steady state, the first step's warm-up left out.
    span = stepped[-1]["time"] - stepped[0]["time"]
    examples = (len(stepped) - 1) * batch
    return {"steps": len(stepped), "batch": batch, "examples_per_s": round(examples / span, 2) if span > 0 else None,
            "s_per_step": round(span / max(1, len(stepped) - 1), 2), "wall_s": round(wall, 1),
            "final_loss": round(stepped[-1]["loss"], 4)}


def training_bench(steps: int, batch: int) -> dict[str, Any]:
    """Examples per second of each fine-tune method on the real small model, on CPU."""
    from runner import smollm
    from tests.real_model import models_cache

    hub = models_cache()
    smollm.install(hub)
    results = {}
    with tempfile.TemporaryDirectory(prefix="helix-bench-train-") as scratch:
        for method in ("sft", "dpo", "reward_model"):
            results[method] = _training_run(method, hub, Path(scratch) / method, steps, batch)
            print(f"  {method}: {results[method]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seeds", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["retrieval", "training"])
    parser.add_argument("--quick", action="store_true", help=f"smaller counts: {QUICK}")
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pg-admin-url", default=os.environ.get("HELIX_TEST_POSTGRES_URL", DEFAULT_PG))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.queries, args.steps = QUICK["chunks"], QUICK["queries"], QUICK["steps"]
    out: dict[str, Any] = {}
    if args.only in (None, "retrieval"):
        out["retrieval"] = retrieval_bench(args.chunks, args.queries, args.pg_admin_url)
        print("retrieval per turn (retrieval.ground over one knowledge base):")
        for db, fig in out["retrieval"].items():
            print(f"  {db:10} {fig}")
    if args.only in (None, "training"):
        print("training throughput on CPU (SmolLM2-135M-Instruct, LoRA r16, seq 256):")
        out["training"] = training_bench(args.steps, args.batch)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
