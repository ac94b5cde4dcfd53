"""What a runner is told at start: where the API is, which tasks to take, how patient to be."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from runner.capacity import DEFAULT_HEADROOM
from runner.messages import FINETUNE

CLAIM_PATH = "/api/v1/worker/task"


def default_runner_name() -> str:
    """`hostname-pid`: unique enough for an operator to tell runners apart."""
    return f"{socket.gethostname()}-{os.getpid()}"


def default_cache_dir() -> str:
    """~/.cache/helix-runner (the CLI lets HELIX_RUNNER_CACHE or --cache-dir say otherwise)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "helix-runner")


def parse_gpu_memory(entries: tuple[str, ...] | list[str]) -> dict[int, str]:
    """`("0:20GiB", "1:20GiB")` -> `{0: "20GiB", 1: "20GiB"}`; a bare `20GiB` means GPU 0."""
    limits: dict[int, str] = {}
    for entry in entries:
        for part in filter(None, entry.replace(",", " ").split()):
            index, sep, amount = part.rpartition(":")
            if not sep:
                index, amount = "0", part
            if not index.isdigit() or not amount:
                raise ValueError(f"not GPU:AMOUNT (like 0:20GiB): {part!r}")
            limits[int(index)] = amount
    return limits


@dataclass(frozen=True)
class RetryPolicy:
    """How the client retries transient failures: exponential backoff with jitter, capped."""

    attempts: int = 8
    max_delay: float = 60.0  # seconds spent retrying one call before giving up
    initial: float = 0.5  # the first backoff is random in [0, initial]
    cap: float = 10.0  # no single backoff is longer than this


@dataclass(frozen=True)
class Kind:
    """One queue a runner polls: a (mode, type, model) triple, spelled `MODE:TYPE:MODEL` on the wire."""

    mode: str
    type: str
    model_name: str

    @classmethod
    def parse(cls, text: str) -> Kind:
        """`create:text:mistralai/Mistral-7B-Instruct-v0.1` -> Kind; mode and type lowered, the model exact."""
        mode, _, rest = text.strip().partition(":")
        type_, _, model_name = rest.partition(":")
        if not mode or not type_ or not model_name.strip():
            raise ValueError(f"not MODE:TYPE:MODEL (like create:text:mistral-7b-instruct): {text!r}")
        return cls(mode.lower(), type_.lower(), model_name.strip())

    @property
    def spelled(self) -> str:
        """The `kind=` value of a poll."""
        return f"{self.mode}:{self.type}:{self.model_name}"

    def as_json(self) -> dict[str, str]:
        """As the runner report lists it."""
        return {"mode": self.mode, "type": self.type, "model_name": self.model_name}


@dataclass(frozen=True)
class RunnerConfig:
    """Everything a runner needs, read once at the edge (the CLI) and passed in."""

    api_url: str
    token: str
    mode: str
    type: str
    model_name: str
    backend: str = ""
    runner_name: str = field(default_factory=default_runner_name)
    # Long-poll seconds per claim, the most the API allows: an idle fleet costs the API one request per
    # runner per `wait`, so the longest wait is the cheapest.
    wait: float = 30.0
    idle_sleep: float = 1.0  # least time between two claims that found no work
    error_backoff: float = 5.0  # pause after the API stayed unavailable through all retries
    grace_seconds: float = 8.0  # how long a stopping runner lets the task in hand finish
    # How long a stopping runner keeps trying an API it cannot reach (to hand back or complete what it
    # holds) before it exits without it; the task's lease then runs out and the API requeues it.
    api_grace_seconds: float = 5.0
    max_tasks: int | None = None
    # Further queues polled beside (mode, type, model_name), from `--kind`: e.g. the fine-tuning of the
    # model this runner serves. Empty: the one queue, polled with the seed's mode/type/model_name URL.
    more_kinds: tuple[Kind, ...] = ()
    request_timeout: float = 10.0
    flush_interval: float = 0.05  # events are posted at least this often while a task streams
    batch_size: int = 32  # ... or as soon as this many are waiting
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Where the model goes and how much memory it may take (placement flags as in accelerate's big-model loading).
    device: str = "auto"  # auto (cuda when there is one), cpu or cuda
    dtype: str = "auto"  # auto (bfloat16/float16 on a GPU, float32 on CPU), float32, float16, bfloat16
    gpu_memory: dict[int, str] = field(default_factory=dict)  # GPU index -> "20GiB": accelerate's max_memory
    cpu_memory: str | None = None  # offload what does not fit on the GPUs to this much CPU memory
    quantize: str | None = None  # None, "8bit" or "4bit" (bitsandbytes, GPU only)
    max_parallel: int = 1  # tasks held and run together on one loaded model; with parallel_auto, the most
    # `--max-parallel auto`: the backend sizes its slots from the memory free after setup() (runner.capacity),
    # up to max_parallel; a backend with no model config to size by holds one.
    parallel_auto: bool = False
    kv_headroom: float = DEFAULT_HEADROOM  # share of that free memory the KV caches may take
    # How the model writes tool calls (runner.backends.tool_calls): hermes, mistral, or auto (mistral when the
    # tokenizer has a [TOOL_CALLS] token, else hermes).
    tool_format: str = "auto"
    # Fetched files and unpacked adapters (by checksum), and scratch space for training.
    cache_dir: str = field(default_factory=default_cache_dir)
    work_dir: str = ""  # default: cache_dir/work

    @property
    def kinds(self) -> tuple[Kind, ...]:
        """Every queue this runner polls, the first one (mode, type, model_name) first."""
        first = Kind(self.mode, self.type, self.model_name)
        return (first, *(kind for kind in self.more_kinds if kind != first))

    @property
    def predicts(self) -> bool:
        """Whether any of its queues is inference (predict()), so the backend loads the model for serving."""
        return any(kind.mode != FINETUNE for kind in self.kinds)

    @property
    def trains(self) -> bool:
        """Whether any of its queues is fine-tuning (train())."""
        return any(kind.mode == FINETUNE for kind in self.kinds)

    @property
    def work_path(self) -> str:
        """Scratch space for training runs."""
        return self.work_dir or os.path.join(self.cache_dir, "work")


@dataclass(frozen=True)
class JobFilter:
    """The parts of a claim URL: the API's base URL and the filters a runner claims by."""

    api_url: str
    mode: str | None = None
    type: str | None = None
    model_name: str | None = None
    wait: float | None = None


def normalize_api_url(url: str) -> str:
    """The API's base URL without a trailing slash or `/api/v1`, so paths can be appended."""
    url = url.strip().rstrip("/")
    if url.endswith("/api/v1"):
        url = url[: -len("/api/v1")]
    return url


def parse_job_url(url: str) -> JobFilter:
    """Split a claim URL such as HELIX_GET_JOB_URL into the API base URL and its filters."""
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"not an absolute URL: {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(CLAIM_PATH):
        raise ValueError(f"a job URL ends in {CLAIM_PATH}?mode=...&type=...&model_name=..., got {url!r}")
    # Anything before the claim path is a prefix the API is mounted under (a reverse proxy's).
    base = urlunsplit((parts.scheme, parts.netloc, path[: -len(CLAIM_PATH)], "", ""))
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    mode, type_ = query.get("mode"), query.get("type")
    wait = query.get("wait")
    return JobFilter(
        api_url=base,
        # The API reads mode and type case-insensitively; model names are exact.
        mode=mode.lower() if mode else None,
        type=type_.lower() if type_ else None,
        model_name=query.get("model_name") or None,
        wait=float(wait) if wait else None,
    )
