"""`helix-runner`: the entry point that reads configuration, wires the runner up and handles signals."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import click
from click.core import ParameterSource

from runner import metrics
from runner.backends import load_backend
from runner.capacity import DEFAULT_CAP
from runner.client import CONNECTIONS_PER_SLOT, ApiClient
from runner.config import (
    JobFilter,
    Kind,
    RunnerConfig,
    default_cache_dir,
    default_runner_name,
    normalize_api_url,
    parse_gpu_memory,
    parse_job_url,
)
from runner.errors import ApiError, ApiUnavailable, BackendNotFound
from runner.loop import Runner
from runner.placement import PlacementError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MOST_PARALLEL = 256


class MaxParallel(click.ParamType):
    """--max-parallel: a number of slots from 1 to 256, or `auto` (None: sized from memory after loading)."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        if text.isdigit() and 1 <= int(text) <= MOST_PARALLEL:
            return int(text)
        self.fail(f"{value!r} is not a number from 1 to {MOST_PARALLEL}, nor auto.", param, ctx)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--backend", envvar="HELIX_RUNNER_BACKEND", show_envvar=True, required=True, metavar="NAME",
              help="A registered backend name, or an import path package.module:Class.")
@click.option("--job-url", envvar="HELIX_GET_JOB_URL", show_envvar=True, metavar="URL",
              help="The full claim URL with its filters, e.g. http://host:8080/api/v1/worker/task"
                   "?mode=Create&type=Text&model_name=mistralai/Mistral-7B-Instruct-v0.1.")
@click.option("--api-url", envvar="HELIX_API_URL", show_envvar=True, metavar="URL",
              help="The API's base URL, e.g. http://host:8080, used with --mode/--type/--model-name.")
@click.option("--mode", help="Tasks to take: create or finetune (overrides the job URL's).")
@click.option("--type", "type_", help="Tasks to take: text or image (overrides the job URL's).")
@click.option("--model-name", help="Tasks to take: the exact model name (overrides the job URL's).")
@click.option("--kind", "kinds", envvar="HELIX_RUNNER_KINDS", show_envvar=True, multiple=True,
              metavar="MODE:TYPE:MODEL",
              help="A queue to poll, repeatable (the env var comma-separated), e.g. --kind create:text:M "
                   "--kind finetune:text:M: one process serves both; instead of --mode/--type/--model-name "
                   "(the job URL then only says where the API is).")
@click.option("--token", envvar="HELIX_RUNNER_TOKEN", show_envvar=True, metavar="TOKEN",
              help="A runner token (hxr_...).")
@click.option("--runner-name", envvar="HELIX_RUNNER_NAME", show_envvar=True, default=default_runner_name,
              show_default="hostname-pid", help="The name operators see on the tasks this runner holds.")
@click.option("--wait", type=click.FloatRange(0, 30), default=None,
              help="Long-poll seconds per claim. [default: the job URL's wait, else 30, the API's most]")
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, help="Exit after this many tasks.")
@click.option("--grace", type=click.FloatRange(min=0), default=8.0, show_default=True,
              help="Seconds a stopping runner lets the task in hand finish before handing it back.")
@click.option("--device", envvar="HELIX_RUNNER_DEVICE", show_envvar=True, default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]), help="Where the model runs (auto: cuda when present).")
@click.option("--dtype", envvar="HELIX_RUNNER_DTYPE", show_envvar=True, default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Weights' dtype (auto: bfloat16 or float16 on a GPU, float32 on CPU).")
@click.option("--gpu-memory", envvar="HELIX_RUNNER_GPU_MEMORY", show_envvar=True, multiple=True,
              metavar="GPU:AMOUNT", help="Most memory per GPU, e.g. --gpu-memory 0:20GiB --gpu-memory 1:20GiB.")
@click.option("--cpu-memory", envvar="HELIX_RUNNER_CPU_MEMORY", show_envvar=True, metavar="AMOUNT",
              help="Offload what does not fit on the GPUs to this much CPU memory, e.g. 32GiB.")
@click.option("--load-in-8bit", "quantize", flag_value="8bit", default=None,
              help="Load weights in 8 bits (bitsandbytes; needs a GPU).")
@click.option("--load-in-4bit", "quantize", flag_value="4bit",
              help="Load weights in 4 bits (bitsandbytes; needs a GPU).")
@click.option("--max-parallel", envvar="HELIX_RUNNER_MAX_PARALLEL", show_envvar=True, default="1", show_default=True,
              type=MaxParallel(), metavar="N|auto",
              help="Tasks held at once and generated together on the loaded model; auto: as many as the memory "
                   "free after loading holds at the model's context length (see --max-parallel-cap).")
@click.option("--max-parallel-cap", envvar="HELIX_RUNNER_MAX_PARALLEL_CAP", show_envvar=True, default=DEFAULT_CAP,
              show_default=True, type=click.IntRange(1, MOST_PARALLEL),
              help="The most slots --max-parallel auto gives.")
@click.option("--tool-format", envvar="HELIX_RUNNER_TOOL_FORMAT", show_envvar=True, default="auto",
              show_default=True, type=click.Choice(["auto", "hermes", "mistral"], case_sensitive=False),
              help="How the model writes tool calls: hermes (<tool_call>...</tool_call>) or mistral "
                   "([TOOL_CALLS] [...]); auto: mistral when the tokenizer has a [TOOL_CALLS] token.")
@click.option("--cache-dir", envvar="HELIX_RUNNER_CACHE", show_envvar=True, default=default_cache_dir,
              show_default="~/.cache/helix-runner", help="Where fetched files and adapters are kept.")
@click.option("--metrics-port", envvar="HELIX_RUNNER_METRICS_PORT", show_envvar=True, type=click.IntRange(1, 65535),
              default=None, help="Serve Prometheus metrics at http://HOST:PORT/metrics (off by default).")
@click.option("--metrics-host", envvar="HELIX_RUNNER_METRICS_HOST", show_envvar=True, default="0.0.0.0",
              show_default=True, help="The address --metrics-port listens on.")
@click.option("--log-level", envvar="HELIX_LOG_LEVEL", show_envvar=True, default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def main(ctx: click.Context, backend: str, job_url: str | None, api_url: str | None, mode: str | None,
         type_: str | None, model_name: str | None, kinds: tuple[str, ...], token: str | None, runner_name: str,
         wait: float | None, max_tasks: int | None, grace: float, device: str, dtype: str,
         gpu_memory: tuple[str, ...], cpu_memory: str | None, quantize: str | None, max_parallel: int | None,
         max_parallel_cap: int, tool_format: str, cache_dir: str, metrics_port: int | None, metrics_host: str,
         log_level: str) -> None:
    """Run a Helix job runner: load a model once, then pull tasks from the API and run them."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    polled = _kinds(kinds)
    if polled and (mode or type_ or model_name):
        raise click.UsageError("pass either --kind (repeatable) or --mode/--type/--model-name, not both")
    target = _target(ctx, job_url, api_url, mode, type_, model_name, polled)
    if not token:
        raise click.UsageError("no runner token: set HELIX_RUNNER_TOKEN or pass --token "
                               "(make one with `helix runner-token create`)")
    if wait is None:
        wait = target.wait if target.wait is not None else RunnerConfig.wait
    auto = max_parallel is None
    most = max_parallel_cap if max_parallel is None else max_parallel
    # Sized for every slot --max-parallel may open: the backend's own cap is known only after setup().
    client = ApiClient(target.api_url, token, runner_name, timeout=RunnerConfig.request_timeout,
                       pool_size=CONNECTIONS_PER_SLOT * most)
    # Aliases resolved once: the weights load by the full name, and tasks carry it.
    polled = [Kind(kind.mode, kind.type, _full_model_name(client, kind.model_name)) for kind in polled]
    first = polled[0] if polled else Kind(target.mode or "", target.type or "",
                                          _full_model_name(client, target.model_name or ""))
    config = RunnerConfig(
        api_url=target.api_url, token=token, mode=first.mode, type=first.type, model_name=first.model_name,
        more_kinds=tuple(polled[1:]), backend=backend, runner_name=runner_name,
        wait=wait, grace_seconds=grace, max_tasks=max_tasks, device=device, dtype=dtype,
        gpu_memory=_gpu_memory(gpu_memory), cpu_memory=cpu_memory or None, quantize=quantize,
        max_parallel=most, parallel_auto=auto, cache_dir=cache_dir, tool_format=tool_format.lower(),
    )
    try:
        model = load_backend(backend, config)
    except BackendNotFound as exc:
        raise click.UsageError(str(exc)) from exc
    runner = Runner(config, model, client)
    if metrics_port is not None:
        try:
            metrics.serve(metrics_port, metrics_host)
        except OSError as exc:
            raise click.UsageError(f"--metrics-port {metrics_port}: {exc.strerror or exc}") from exc
    previous = _install_signal_handlers(runner)
    try:
        runner.run()
    except ApiError as exc:
        # Retrying will not help (a bad token, an unknown model): say so plainly and exit.
        raise click.ClickException(f"the API refused this runner: {exc}") from exc
    except PlacementError as exc:
        # The model cannot be loaded as configured (it does not fit, no GPU for 8-bit...): before any claim.
        raise click.ClickException(str(exc)) from exc
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _full_model_name(client: ApiClient, name: str) -> str:
    """The full name the API gives the model called `name`: a job URL may name a model by its alias, but the
    weights are loaded by the full name (a hub id or a path), which the claimed tasks carry too."""
    if "/" in name:
        # An alias never holds a slash, and an `org/name` hub id or a path is loaded as it is: no need to ask.
        return name
    try:
        full = client.full_model_name(name)
    except ApiUnavailable as exc:
        # The runner waits out an unreachable API later anyway; a full name loads as it is.
        logger.warning("could not ask the API which model %r names (%s): loading it by that name", name, exc)
        return name
    except ApiError as exc:
        raise click.ClickException(f"the API refused this runner: {exc}") from exc
    if full != name:
        logger.info("model %r is the API's alias of %s: loading that", name, full)
    return full


def _gpu_memory(entries: tuple[str, ...]) -> dict[int, str]:
    try:
        return parse_gpu_memory(entries)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpu-memory") from exc


def _kinds(entries: tuple[str, ...]) -> list[Kind]:
    """--kind values (each may hold several, comma-separated, as HELIX_RUNNER_KINDS does), in order, once each."""
    try:
        kinds = [Kind.parse(part) for entry in entries for part in entry.split(",") if part.strip()]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kind") from exc
    return list(dict.fromkeys(kinds))


def _target(ctx: click.Context, job_url: str | None, api_url: str | None, mode: str | None,
            type_: str | None, model_name: str | None, kinds: list[Kind] | None = None) -> JobFilter:
    """Where to claim from and by which filters: flags first, then HELIX_GET_JOB_URL, then HELIX_API_URL.

    With `kinds` (--kind), the queues are those, and a job URL only says where the API is.
    """
    if job_url:
        try:
            found = parse_job_url(job_url)
        except ValueError as exc:
            raise click.UsageError(f"HELIX_GET_JOB_URL: {exc}") from exc
    elif api_url:
        found = JobFilter(api_url=api_url)
    else:
        raise click.UsageError("no API to claim from: set HELIX_GET_JOB_URL (or HELIX_API_URL with "
                               "--mode, --type and --model-name, or --kind)")
    # An --api-url typed on the command line beats the job URL's base; HELIX_API_URL in the env does not.
    if api_url and ctx.get_parameter_source("api_url") is ParameterSource.COMMANDLINE:
        base = api_url
    else:
        base = found.api_url
    if kinds:
        return JobFilter(api_url=normalize_api_url(base), wait=found.wait)
    target = JobFilter(
        api_url=normalize_api_url(base),
        mode=(mode or found.mode or "").lower() or None,
        type=(type_ or found.type or "").lower() or None,
        model_name=model_name or found.model_name,
        wait=found.wait,
    )
    missing = [flag for flag, value in (("--mode", target.mode), ("--type", target.type),
                                        ("--model-name", target.model_name)) if not value]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)}: pass them, or put them in HELIX_GET_JOB_URL")
    return target


def _install_signal_handlers(runner: Runner) -> dict[int, object]:
    """SIGTERM and SIGINT stop the runner gracefully; a second one stops it at once."""

    def handle(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        runner.stop()

    previous: dict[int, object] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handle)
    return previous
