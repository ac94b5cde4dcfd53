"""Structured output benchmark (issue 25): what constrained decoding and logprobs cost, and what they buy.

    .venv/bin/python -m bench.structured            # SmolLM2-135M-Instruct on CPU (about 4-5 minutes on 2 busy cores)
    .venv/bin/python -m bench.structured --quick    # fewer tokens and replies (under a minute)
    .venv/bin/python -m bench.structured --model PATH --quick   # another model, e.g. the tiny Mistral (smoke test)

The model is loaded as the runner loads it (runner.backends.mistral, on CPU) and 8 slots decode together
through TextGenerator (max_batch 8), each run one batch of 8 requests. Figures, printed (no assertions):

- tokens/s with every slot constrained by a JSON schema of 10 fields, against the same 8 requests free
  (target >= 0.8x);
- tokens/s of the 4 free rows of a batch whose other 4 rows are constrained, against the same 4 rows in the
  all-free batch (target: no more than 5% slower); a row's rate is its tokens over the time its last token
  was streamed;
- tokens/s with top_logprobs 5 on every slot against none;
- schema compile time, cold (a grammar never seen) and cached;
- the share of 50 replies (sampled, one seed each) that parse as JSON and validate against the schema, with
  the same instruction in the prompt, constrained against free (target 100% constrained).

SmolLM2 comes from PyPI converted once (runner.smollm) into ~/.cache/helix-test-models/hub, as the slow tests
keep it; the benchmark loads it offline from there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench.structured")

SLOTS = 8
TARGET_CONSTRAINED_RATIO = 0.8
TARGET_NEIGHBOUR_SLOWDOWN_PCT = 5.0
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 32},
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "member": {"type": "boolean"},
        "plan": {"enum": ["free", "pro", "team"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["name", "age", "email", "city", "country", "height_m", "member", "plan", "tags", "score"],
    "additionalProperties": False,
}
INSTRUCTION = (
    "Invent a customer profile. Reply with only a JSON object, no other text, with exactly these fields: "
    "name (string), age (integer 0-120), email (string), city (string), country (string), height_m (number "
    "0.5-2.5), member (true or false), plan (\"free\", \"pro\" or \"team\"), tags (a list of up to 3 short "
    "strings), score (integer 0-100)."
)
FREE_PROMPTS = ["Tell me a story about a lighthouse keeper.", "Explain how bread rises.",
                "Write a letter to a friend about your garden.", "Describe a busy market in the morning.",
                "What makes a good teacher?", "Explain why the sky is blue.",
                "Tell me about the history of bicycles.", "Describe your favourite season."]
# reply_tokens: the validity check's budget; SmolLM2 writes the 10-field object in about 70-90 tokens.
SIZES = {"full": {"tokens": 64, "replies": 50, "compiles": 5, "reply_tokens": 140, "repeats": 2},
         "quick": {"tokens": 16, "replies": 8, "compiles": 3, "reply_tokens": 140, "repeats": 2}}


@dataclass
class Row:
    """One request of a run and when it streamed its last text."""

    request: Any
    started: float = 0.0
    last: float = 0.0
    pieces: list[str] = field(default_factory=list)

    def on_text(self, text: str) -> None:
        self.pieces.append(text)
        self.last = time.monotonic()

    @property
    def tokens_per_s(self) -> float:
        elapsed = (self.last or time.monotonic()) - self.started
        return self.request.completion_tokens / elapsed if elapsed > 0 else 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and replies")
    p.add_argument("--model", default=None, help="a model path or hub id instead of SmolLM2-135M-Instruct")
    p.add_argument("--replies", type=int, default=None, help="replies in the validity check (default 50, quick 16)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def load_backend(model: str | None) -> Any:
    """The text backend with 8 slots on CPU, on SmolLM2 (installed offline into the test models' cache) or `model`."""
    if model is None:
        from runner import smollm

        hub = Path(os.environ.get("HELIX_TEST_MODELS") or "~/.cache/helix-test-models").expanduser() / "hub"
        smollm.install(hub)
        os.environ["HF_HUB_CACHE"] = str(hub)
        os.environ["HF_HUB_OFFLINE"] = "1"
        model = smollm.NAME
    from runner.backends.mistral import MistralBackend
    from runner.config import RunnerConfig

    config = RunnerConfig(api_url="http://bench.invalid", token="hxr_bench", mode="create", type="text",
                          model_name=model, backend="mistral", device="cpu", max_parallel=SLOTS)
    backend = MistralBackend(config)
    backend.setup()
    return backend


class Bench:
    """The runs, on one loaded backend."""

    def __init__(self, backend: Any, tokens: int) -> None:
        from runner.backends.constraints import ReplyRules, reply_grammar

        self.backend = backend
        self.tokens = tokens
        rules = ReplyRules.from_params({"response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "profile", "schema": SCHEMA}}})
        self.grammar = reply_grammar(rules, backend.tool_format)
        self.instruction_ids = backend.prompt_ids([{"role": "user", "content": INSTRUCTION}])
        self.free_ids = [backend.prompt_ids([{"role": "user", "content": p}]) for p in FREE_PROMPTS]

    def request(self, prompt_ids: list[int], seed: int, *, constrained: bool = False, top_logprobs: int | None = None,
                max_new_tokens: int | None = None, temperature: float = 0.0) -> Row:
        from runner.backends.text_generation import GenerationRequest, SamplingParams

        params = SamplingParams.from_params({"max_new_tokens": max_new_tokens or self.tokens, "seed": seed,
                                             "temperature": temperature})
        row = Row(None)
        row.request = GenerationRequest(
            prompt_ids=prompt_ids, params=params, on_text=row.on_text,
            constraint=self.backend.grammars.constraint(self.grammar) if constrained else None,
            logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0)
        return row

    def run(self, rows: list[Row], watched: int = SLOTS) -> dict[str, float]:
        """One batch of `rows`; total tokens/s, and the tokens/s of the first `watched` rows."""
        started = time.monotonic()
        for row in rows:
            row.started = started
        self.backend.generator.run_batch([row.request for row in rows])
        wall = time.monotonic() - started
        for row in rows:
            if row.request.error is not None:
                raise row.request.error
        tokens = sum(row.request.completion_tokens for row in rows)
        watched_tokens = sum(row.request.completion_tokens for row in rows[:watched])
        watched_wall = max((row.last - started for row in rows[:watched]), default=0.0)
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "watched_tokens_per_s": watched_tokens / watched_wall if watched_wall else 0.0}

    def free_rows(self, **kwargs: Any) -> list[Row]:
        """Eight free rows: different prompts, greedy, no EOS before the budget in practice."""
        return [self.request(ids, seed=index, **kwargs) for index, ids in enumerate(self.free_ids)]

    def paired(self, make_a: Any, make_b: Any, repeats: int, figure: str = "tokens_per_s",
               watched: int = SLOTS) -> tuple[float, float]:
        """`figure` of two kinds of batch, run by turns so a burst of load on a shared machine hits both; the best
        of `repeats` each."""
        a, b = [], []
        for _ in range(repeats):
            a.append(self.run(make_a(), watched)[figure])
            b.append(self.run(make_b(), watched)[figure])
        return max(a), max(b)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and measure every figure (bench.all calls this with parse_args's namespace)."""
    started = time.monotonic()
    figures = measure_backend(load_backend(args.model), args.quick, args.replies)
    figures["seconds"] = time.monotonic() - started
    return figures


def measure_backend(backend: Any, quick: bool, replies: int | None = None) -> dict[str, Any]:
    """Every figure on a loaded backend, as a flat dict."""
    import jsonschema

    from runner.backends.constraints import ReplyRules, reply_grammar

    size = SIZES["quick" if quick else "full"]
    bench = Bench(backend, size["tokens"])
    repeats = size["repeats"]
    figures: dict[str, Any] = {"model": backend.model_name, "slots": SLOTS, "max_new_tokens": size["tokens"],
                               "repeats": repeats}
    # Warm-up: the first batches of a process are slower, and llguidance builds its lexer states lazily.
    for constrained_rows in (False, True):
        bench.run([bench.request(bench.instruction_ids, seed=i, temperature=0.7, constrained=constrained_rows,
                                 max_new_tokens=size["tokens"]) for i in range(SLOTS)])

    logger.info("throughput: all free against all constrained")
    # Both sample (temperature 0.7, one seed per row) from the JSON instruction.
    free, constrained = bench.paired(
        lambda: [bench.request(bench.instruction_ids, seed=i, temperature=0.7) for i in range(SLOTS)],
        lambda: [bench.request(bench.instruction_ids, seed=i, temperature=0.7, constrained=True)
                 for i in range(SLOTS)], repeats)
    figures.update(free_tokens_per_s=free, constrained_tokens_per_s=constrained, constrained_ratio=constrained / free)

    logger.info("throughput: the free half of a half-constrained batch")

    def beside(constrained_rows: bool) -> list[Row]:
        # The 4 watched free rows, and 4 neighbours that outlast them (free or constrained).
        return bench.free_rows()[:4] + [
            bench.request(bench.instruction_ids, seed=i, temperature=0.7, constrained=constrained_rows,
                          max_new_tokens=2 * size["tokens"]) for i in range(4)]

    reference, mixed = bench.paired(lambda: beside(False), lambda: beside(True), repeats,
                                    figure="watched_tokens_per_s", watched=4)
    figures.update(neighbours_free_tokens_per_s=reference, neighbours_mixed_tokens_per_s=mixed,
                   neighbours_slowdown_pct=100.0 * (1 - mixed / reference))

    logger.info("throughput: top_logprobs 5 on every slot")
    plain, scored = bench.paired(bench.free_rows, lambda: bench.free_rows(top_logprobs=5), repeats)
    figures.update(plain_tokens_per_s=plain, logprobs_tokens_per_s=scored, logprobs_ratio=scored / plain)

    logger.info("schema compile, cold and cached")
    grammars = backend.grammars
    colds, warms = [], []
    for index in range(size["compiles"]):
        schema = {**SCHEMA, "description": f"never seen before {time.time_ns()} {index}"}
        grammar = reply_grammar(ReplyRules.from_params({"response_format": {"type": "json_schema", "json_schema": {
            "name": "profile", "schema": schema}}}), backend.tool_format)
        started = time.perf_counter()
        grammars.constraint(grammar)
        colds.append(time.perf_counter() - started)
        started = time.perf_counter()
        grammars.constraint(grammar)
        warms.append(time.perf_counter() - started)
    figures.update(compile_cold_ms=1000 * statistics.median(colds), compile_cached_ms=1000 * statistics.median(warms))

    logger.info("validity of %s replies, constrained and free", replies or size["replies"])
    count = replies or size["replies"]
    for name, constrained_rows in (("constrained", True), ("free", False)):
        valid = 0
        for start in range(0, count, SLOTS):
            rows = [bench.request(bench.instruction_ids, seed=1000 + i, temperature=0.7, constrained=constrained_rows,
                                  max_new_tokens=size["reply_tokens"]) for i in range(start, min(count, start + SLOTS))]
            bench.run(rows)
            for row in rows:
                try:
                    jsonschema.validate(json.loads(row.request.text.strip()), SCHEMA)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    logger.debug("%s reply not valid: %r", name, row.request.text[:120])
        figures[f"{name}_valid_pct"] = 100.0 * valid / count
    figures["replies"] = count
    return figures


def report(figures: dict[str, Any]) -> str:
    """The figures as text."""
    f = figures
    verdict = ("meets" if f["constrained_ratio"] >= TARGET_CONSTRAINED_RATIO else "MISSES")
    slow = ("meets" if f["neighbours_slowdown_pct"] <= TARGET_NEIGHBOUR_SLOWDOWN_PCT else "MISSES")
    valid = "meets" if f["constrained_valid_pct"] >= 100.0 else "MISSES"
    lines = [
        f"bench.structured: {f['model']} on CPU ({os.cpu_count()} cores), {f['slots']} slots in one batch, "
        f"up to {f['max_new_tokens']} new tokens per row, best of {f['repeats']} runs each; {f.get('seconds', 0):.0f}s",
        f"  every slot constrained (10-field schema): {f['constrained_tokens_per_s']:.1f} tokens/s "
        f"vs free {f['free_tokens_per_s']:.1f} = {f['constrained_ratio']:.2f}x "
        f"(target >= {TARGET_CONSTRAINED_RATIO}x: {verdict})",
        f"  4 free rows beside 4 constrained: {f['neighbours_mixed_tokens_per_s']:.1f} tokens/s vs beside 4 free "
        f"{f['neighbours_free_tokens_per_s']:.1f}: slowdown {f['neighbours_slowdown_pct']:.1f}% "
        f"(target <= {TARGET_NEIGHBOUR_SLOWDOWN_PCT:.0f}%: {slow})",
        f"  top_logprobs 5 on every slot: {f['logprobs_tokens_per_s']:.1f} tokens/s vs none "
        f"{f['plain_tokens_per_s']:.1f} = {f['logprobs_ratio']:.2f}x",
        f"  schema compile: cold {f['compile_cold_ms']:.2f} ms, cached {f['compile_cached_ms']:.3f} ms",
        f"  {f['replies']} replies that parse and validate: constrained {f['constrained_valid_pct']:.0f}% "
        f"(target 100%: {valid}), free {f['free_valid_pct']:.0f}%",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "torchao", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    figures = measure(args)
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
