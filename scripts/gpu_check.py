"""Run Helix's GPU paths on this machine, on tiny models built here: one line per path, PASS, FAIL or SKIP.

Each path goes through the real backends (runner.backends.mistral, .sdxl and their fine-tunes) on the tiny
Mistral and SDXL of runner.tiny, so nothing is downloaded: CUDA chat in float16 and bfloat16, 8- and 4-bit
loading, a memory map over two GPUs, a text LoRA/QLoRA fine-tune with axolotl, SDXL in float16 and its
LoRA fine-tune; and, where the API's packages are installed, one chat and one image through a real
`helix serve` and `helix-runner`. A path whose packages or hardware this machine lacks says SKIP and why;
on a machine without a GPU every path does, and the exit status is 0. Any FAIL makes it 1.

    scripts/gpu-check.sh                 # on the GPU (what it is for)
    scripts/gpu-check.sh --device cpu    # the same paths on the CPU where they can run: the script's own check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the runner and its test doubles, installed or not


class Skip(Exception):
    """This machine cannot run the path; the message says why."""


def needs(*modules: str) -> None:
    """Skip unless every module is importable."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise Skip(f"{', '.join(missing)} not installed")


class Machine:
    """What the paths share: the device to run on, a scratch directory, the tiny models built once."""

    def __init__(self, device: str, work: Path) -> None:
        self.device = device
        self.work = work
        self._models: dict[str, Path] = {}

    def gpus(self) -> int:
        """CUDA devices torch sees (0 when checking on the CPU)."""
        import torch

        return torch.cuda.device_count() if self.device == "cuda" else 0

    def tiny_mistral(self) -> Path:
        """The tiny Mistral, built on first use."""
        if "mistral" not in self._models:
            from runner.tiny.mistral import build_tiny_mistral

            self._models["mistral"] = build_tiny_mistral(self.work / "tiny-mistral")
        return self._models["mistral"]

    def tiny_sdxl(self) -> Path:
        """The tiny SDXL pipeline, built on first use (needs diffusers)."""
        needs("diffusers")
        if "sdxl" not in self._models:
            from runner.tiny.sdxl import build_tiny_sdxl

            self._models["sdxl"] = build_tiny_sdxl(self.work / "tiny-sdxl")
        return self._models["sdxl"]

    def config(self, model: Path, *, mode: str = "create", type_: str = "text", **overrides: Any) -> Any:
        """A runner config for one backend on this machine's device."""
        from runner.config import RunnerConfig

        values: dict[str, Any] = {"api_url": "http://127.0.0.1:1", "token": "hxr_gpu_check", "mode": mode,
                                  "type": type_, "model_name": str(model), "device": self.device,
                                  "cache_dir": str(self.work / "runner-cache")}
        return RunnerConfig(**{**values, **overrides})


def _task(mode: str, type_: str, input_: dict[str, Any], **params: Any) -> Any:
    from runner.messages import Task

    return Task(id=1, session_id=1, interaction_id=1, mode=mode, type=type_, model_name="tiny", attempt=1,
                input=input_, params=params)


def _weights(model: Any) -> str:
    """Where the weights are and in what dtype, e.g. `torch.float16 on cuda:0`."""
    placed = sorted({str(p.device) for p in model.parameters()})
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return f"{'/'.join(dtypes)} on {'+'.join(placed)}"


def chat(machine: Machine, **overrides: Any) -> str:
    """A short chat through MistralBackend with these runner options."""
    from runner.backends.mistral import MistralBackend
    from tests.doubles import FakeReport

    backend = MistralBackend(machine.config(machine.tiny_mistral(), **overrides))
    backend.setup()
    result = backend.predict(_task("create", "text", {"messages": [{"role": "user", "content": "Hello!"}]},
                                   max_new_tokens=8, seed=0, temperature=0.8), FakeReport())
    tokens = result["usage"]["completion_tokens"]
    if tokens < 1:
        raise AssertionError(f"no tokens generated: {result}")
    return f"{tokens} tokens, weights {_weights(backend.model)}"


def chat_dtype(dtype: str) -> Callable[[Machine], str]:
    def run(machine: Machine) -> str:
        if dtype == "bfloat16" and machine.device == "cuda":
            import torch

            if not torch.cuda.is_bf16_supported():
                raise Skip("this GPU has no bfloat16")
        detail = chat(machine, dtype=dtype)
        expected = f"torch.{dtype}"
        if not detail.split("weights ")[1].startswith(expected):
            raise AssertionError(f"asked for {dtype}, got {detail}")
        return detail
    return run


def chat_quantized(bits: str) -> Callable[[Machine], str]:
    def run(machine: Machine) -> str:
        if machine.device != "cuda":
            raise Skip("bitsandbytes loading needs a CUDA GPU")
        needs("bitsandbytes")
        return chat(machine, quantize=bits)
    return run


def chat_two_gpus(machine: Machine) -> str:
    """The memory map: GPU 0 capped so the layers spill onto GPU 1."""
    if machine.gpus() < 2:
        raise Skip(f"needs 2 GPUs, {machine.gpus()} found")
    detail = chat(machine, dtype="float16", gpu_memory={0: "40KB", 1: "1GiB"})
    if "cuda:0" not in detail or "cuda:1" not in detail:
        raise AssertionError(f"the weights did not spread over both GPUs: {detail}")
    return detail


def _finetune_text(machine: Machine) -> tuple[str, str]:
    """A 2-step fine-tune with axolotl through MistralBackend.train(); (LoRA or QLoRA, the result)."""
    needs("axolotl")
    from runner.backends.mistral import MistralBackend
    from tests.doubles import FakeFiles, FakeReport

    data = machine.work / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {n} plus {n}?"},
                                                     {"role": "assistant", "content": f"It is {2 * n}."}]}) + "\n"
                            for n in range(12)))
    files = FakeFiles(machine.work / "files")
    ref = files.add(data, name="chats.jsonl")
    backend = MistralBackend(machine.config(machine.tiny_mistral(), mode="finetune"))
    backend.setup()
    report = FakeReport(files)
    result = backend.train(_task("finetune", "text", {"files": [ref]}, max_steps=2, seed=0), report)
    kind = next((e["message"] for e in report.events if e["kind"] == "log"), "")
    if result.get("steps") != 2 or not files.of_kind("adapter"):
        raise AssertionError(f"no adapter after 2 steps: {result}")
    return ("QLoRA" if "QLoRA" in kind else "LoRA"), f"{kind}; {result['text']}"


_text_training: dict[str, Any] = {}


def finetune_text(wanted: str) -> Callable[[Machine], str]:
    """The one text fine-tune the runner picks here (QLoRA where bitsandbytes is installed, else LoRA)."""
    def run(machine: Machine) -> str:
        if wanted == "QLoRA" and (machine.device != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
            raise Skip("QLoRA needs a CUDA GPU and bitsandbytes")
        if "result" not in _text_training:
            try:
                _text_training["result"] = _finetune_text(machine)
            except BaseException as exc:
                _text_training["result"] = exc
        outcome = _text_training["result"]
        if isinstance(outcome, BaseException):
            raise outcome
        kind, detail = outcome
        if kind != wanted:
            raise Skip(f"the runner trains {kind} on this machine (QLoRA only with bitsandbytes on a GPU)")
        return detail
    return run


def sdxl_image(machine: Machine) -> str:
    """One 64x64 image through SDXLBackend in float16 (float32 on the CPU)."""
    from runner.backends.sdxl import SDXLBackend
    from tests.doubles import FakeFiles, FakeReport

    dtype = "float16" if machine.device == "cuda" else "float32"
    backend = SDXLBackend(machine.config(machine.tiny_sdxl(), type_="image", dtype=dtype))
    backend.setup()
    files = FakeFiles(machine.work / "files")
    result = backend.predict(_task("create", "image", {"prompt": "a red boat"}, width=64, height=64,
                                   num_inference_steps=2, seed=0), FakeReport(files))
    [image] = files.of_kind("output")
    if not Path(image["path"]).read_bytes().startswith(b"\x89PNG"):
        raise AssertionError(f"not a PNG: {result}")
    return f"a {result['width']}x{result['height']} PNG, UNet {_weights(backend.pipe.unet)}"


def sdxl_finetune(machine: Machine) -> str:
    """A 2-step SDXL LoRA fine-tune through SDXLBackend.train()."""
    from PIL import Image

    from runner.backends.sdxl import SDXLBackend
    from tests.doubles import FakeFiles, FakeReport

    dtype = "float16" if machine.device == "cuda" else "float32"
    backend = SDXLBackend(machine.config(machine.tiny_sdxl(), mode="finetune", type_="image", dtype=dtype))
    backend.setup()
    files = FakeFiles(machine.work / "files")
    refs = []
    for colour in ("red", "green", "blue"):
        path = machine.work / f"{colour}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        refs.append(files.add(path, name=path.name))
    captions = {ref["name"]: f"a {ref['name'][:-4]} square" for ref in refs}
    result = backend.train(_task("finetune", "image", {"files": refs, "captions": captions}, max_steps=2,
                                 resolution=64, seed=0), FakeReport(files))
    if not files.of_kind("adapter"):
        raise AssertionError(f"no adapter: {result}")
    return f"{result.get('text', '')} ({dtype})".strip()


# Through a real API and runner.


def _api_round_trip(machine: Machine, type_: str, backend: str, model: Path, body: dict[str, Any]) -> str:
    """Start `helix serve` on SQLite and one `helix-runner`, run one task, stop both; the reply's summary."""
    needs("flask", "sqlalchemy", "alembic", "gunicorn", "requests")
    import requests

    data = Path(tempfile.mkdtemp(prefix=f"api-{type_}-", dir=machine.work))
    env = {**os.environ, "HELIX_DATA_DIR": str(data), "HELIX_MODELS": f"{type_}:{model}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("HELIX_DATABASE_URL", None)
    helix = [sys.executable, "-c", "from helix_api.cli.operator import main; main()"]

    def run_helix(*args: str) -> str:
        done = subprocess.run([*helix, "--log-level", "WARNING", *args], env=env, capture_output=True, text=True,
                              timeout=120, check=True)
        return done.stdout.strip().splitlines()[-1]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    run_helix("db", "upgrade")
    key, token = run_helix("users", "create", "gpu-check"), run_helix("runner-token", "create", "--name", "gpu")
    logs = [(data / "api.log").open("w"), (data / "runner.log").open("w")]
    procs = [subprocess.Popen([*helix, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "runner", "--backend", backend, "--api-url", base, "--mode", "create",
             "--type", type_, "--model-name", str(model), "--device", machine.device, "--wait", "5"],
            env={**env, "HELIX_RUNNER_TOKEN": token}, stdout=logs[1], stderr=subprocess.STDOUT))
        headers = {"Authorization": f"Bearer {key}"}
        deadline = time.monotonic() + 120
        session = None
        while session is None:
            try:
                response = requests.post(f"{base}/api/v1/sessions", headers=headers, timeout=10,
                                         json={"type": type_, "model_name": str(model), **body})
                response.raise_for_status()
                session = response.json()
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        while True:
            reply = requests.get(f"{base}/api/v1/sessions/{session['id']}", headers=headers,
                                 timeout=10).json()["interactions"][-1]
            if reply["state"] in ("complete", "error", "cancelled"):
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise AssertionError(f"no reply in time (runner log: {data / 'runner.log'})")
            time.sleep(0.2)
        if reply["state"] != "complete":
            raise AssertionError(f"the reply ended {reply['state']}: {reply.get('error')}")
        runner_log = (data / "runner.log").read_text(errors="replace")
        if machine.device == "cuda" and " on cuda" not in runner_log:
            raise AssertionError(f"the runner did not say it loaded on cuda ({data / 'runner.log'})")
        return f"{type_} reply complete through {base} ({len(reply.get('output') or '')} chars, "\
               f"{len(reply.get('files') or [])} files)"
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def api_chat(machine: Machine) -> str:
    """A chat through a real API and text runner."""
    return _api_round_trip(machine, "text", "mistral", machine.tiny_mistral(),
                           {"message": "Hello!", "params": {"max_new_tokens": 8, "seed": 0}})


def api_image(machine: Machine) -> str:
    """An image through a real API and image runner."""
    return _api_round_trip(machine, "image", "sdxl", machine.tiny_sdxl(),
                           {"message": "a red boat", "params": {"width": 64, "height": 64,
                                                                "num_inference_steps": 2, "seed": 0}})


PATHS: list[tuple[str, Callable[[Machine], str]]] = [
    ("chat-fp16", chat_dtype("float16")),
    ("chat-bf16", chat_dtype("bfloat16")),
    ("chat-8bit", chat_quantized("8bit")),
    ("chat-4bit", chat_quantized("4bit")),
    ("chat-two-gpu-memory-map", chat_two_gpus),
    ("text-finetune-lora", finetune_text("LoRA")),
    ("text-finetune-qlora", finetune_text("QLoRA")),
    ("sdxl-fp16", sdxl_image),
    ("sdxl-finetune", sdxl_finetune),
    ("api-chat", api_chat),
    ("api-image", api_image),
]


def run_path(machine: Machine, name: str, path: Callable[[Machine], str], log: logging.Logger) -> str:
    """Run one path; its line."""
    started = time.monotonic()
    try:
        detail = path(machine)
    except Skip as exc:
        return f"SKIP {name}: {exc}"
    except Exception as exc:
        log.exception("%s failed", name)
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        return f"FAIL {name}: {type(exc).__name__}: {message}"
    return f"PASS {name} ({time.monotonic() - started:.1f}s): {detail}"


def main(argv: list[str] | None = None) -> int:
    """Run every path (or those named) and print one line each; 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (the check), or cpu: run what can run there, to check this script")
    parser.add_argument("--log", default=None, help="where other libraries' output and tracebacks go "
                                                    "[default: a file in the scratch directory, kept on a FAIL]")
    parser.add_argument("only", nargs="*", help="names of the paths to run (default: all)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="helix-gpu-check-"))
    log_path = Path(args.log) if args.log else work / "gpu-check.log"
    terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    # One line per path on the terminal: other libraries' warnings, progress bars and tracebacks (in this
    # process, and in the ones it starts) go to the log, whether Python or C code writes them.
    log_file = log_path.open("a", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    logging.basicConfig(level=logging.INFO, stream=log_file, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("gpu-check")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models only: nothing to fetch
    machine = Machine(args.device, work)
    failed = False
    reason = _no_device(args.device)
    for name, path in PATHS:
        if args.only and name not in args.only:
            continue
        line = f"SKIP {name}: {reason}" if reason else run_path(machine, name, path, log)
        log.info("%s", line)
        failed = failed or line.startswith("FAIL")
        print(line, file=terminal)
    if failed or args.log:
        print(f"(details in {log_path})", file=terminal)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _no_device(device: str) -> str | None:
    """Why no path can run on `device` here, or None."""
    if importlib.util.find_spec("torch") is None:
        return "torch not installed"
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


if __name__ == "__main__":
    sys.exit(main())
