"""LoRA fine-tuning of the text model with axolotl, in a subprocess the runner watches and can stop.

The runner fetches the task's `train.jsonl`, checks every line, writes it and an axolotl config into a
scratch directory, and runs `python -m axolotl.cli.train` there. Training in a child process frees
all of its memory (GPU included) when it exits, and lets a cancel end it at any moment. Progress comes
back as JSON lines written by `runner.backends.axolotl_progress` (a plugin axolotl loads from the
config) to the file named by HELIX_PROGRESS_FILE; this side reads them as they grow and reports each
step with its loss. The adapter (adapter_config.json + adapter_model.safetensors) is uploaded zipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.backends import jsonl, preference
from runner.backends import params as param
from runner.backends.axolotl_progress import PARENT_ENV, PLUGIN_NAME, PROGRESS_ENV
from runner.errors import BadTaskInput, RunnerError

if TYPE_CHECKING:
    from runner.config import RunnerConfig
    from runner.messages import Task
    from runner.reporter import Report

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# axolotl phones home unless told not to, and retries for minutes where no network is reachable.
QUIET_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}
POLL_SECONDS = 0.2  # how often the progress file and the cancel flag are looked at
STOP_SECONDS = 10.0  # how long a stopped training gets to exit after SIGTERM before SIGKILL
LOG_TAIL_LINES = 12  # lines of axolotl's log in the error of a failed run


class FinetuneError(RunnerError):
    """Fine-tuning failed."""


class BadTrainingData(FinetuneError, BadTaskInput):
    """The training data cannot be trained on; another attempt would fail the same way."""


@dataclass(frozen=True)
class TrainingParams:
    """What a user may set for a text fine-tune; defaults fit a 7B model."""

    max_steps: int | None = None  # None: train for num_epochs
    num_epochs: float = 3
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 42

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainingParams:
        """The task's params over the defaults; BadTaskInput names one that cannot be used."""
        defaults = cls()
        max_steps = param.integer(params, "max_steps", 0, low=1) if params.get("max_steps") is not None else None
        return cls(
            max_steps=max_steps,
            num_epochs=param.number(params, "num_epochs", defaults.num_epochs, above=0),
            learning_rate=param.number(params, "learning_rate", defaults.learning_rate, above=0),
            lora_r=param.integer(params, "lora_r", defaults.lora_r, low=1),
            lora_alpha=param.integer(params, "lora_alpha", defaults.lora_alpha, low=1),
            seed=param.integer(params, "seed", defaults.seed, low=0),
        )


@dataclass(frozen=True)
class TrainingSettings:
    """What the operator (or a test) decides: batch shape and sequence length; defaults fit a 7B model."""

    sequence_len: int = 2048
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    lora_dropout: float = 0.05
    warmup_ratio: float = 0.03


def train_lora(task: Task, report: Report, *, config: RunnerConfig,
               settings: TrainingSettings | None = None) -> dict[str, Any]:
    """Train a LoRA adapter on the task's conversations with axolotl, upload it, summarise the run."""
    params = TrainingParams.from_params(task.params)
    settings = settings or TrainingSettings()
    refs = task.input.get("files")
    if not refs:
        raise BadTrainingData("no training data: the task carries no files")
    if not isinstance(refs, list) or not all(isinstance(ref, dict) and "id" in ref for ref in refs):
        raise BadTrainingData("input.files: not a list of file refs")
    work_root = Path(config.work_path)
    work_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"finetune-{task.id}-", dir=work_root))
    method = preference.method_of(task.params)
    try:
        fetched = [(str(ref.get("name") or ref.get("id")), report.files.fetch(ref)) for ref in refs]
        examples = load_examples(fetched) if method == preference.SFT else preference.load_comparisons(fetched)
        data_path = workdir / "data.jsonl"
        preference.write_jsonl(data_path, preference.training_rows(method, examples))
        device = training_device(config.device)
        quantized = device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
        cfg = preference.preference_config(
            axolotl_config(config.model_name, data_path, workdir, params, settings, device=device,
                           quantized=quantized), method, task.params)
        cfg_path = workdir / "axolotl.yml"
        cfg_path.write_text(_dump_yaml(cfg))
        kind = ("QLoRA (4-bit)" if quantized else "LoRA") + ("" if method == preference.SFT else f" {method}")
        logger.info("task %s: training %s on %s with %d examples on %s", task.id, kind, config.model_name,
                    len(examples), device)
        report.log(f"training a {kind} adapter on {len(examples)} examples ({device})")
        steps, loss = run_axolotl(cfg_path, workdir, report, device=device, task_id=task.id)
        adapter_dir = collect_adapter(workdir / "out", workdir / "adapter")
        ref = report.files.upload_dir(adapter_dir, kind="adapter")
        loss_text = f"{loss:.4f}" if loss is not None else "unknown"
        how = "" if method == preference.SFT else f" ({method})"
        return {"text": f"Fine-tuned {config.model_name}{how} for {steps} steps; final loss {loss_text}",
                "adapter_file_id": ref["id"], "steps": steps, "loss": loss, "method": method}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def load_examples(files: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    """Every line of the JSONL files as `{"messages": [...]}`; BadTrainingData naming the bad lines."""
    return jsonl.read(files, lambda row: {"messages": _messages_of(row)}, error=BadTrainingData,
                      what="training data")


def _messages_of(row: Any) -> list[dict[str, str]]:
    """One example's conversation; ValueError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    if "messages" not in row:
        # The API normalises question/answer pairs already; a file written by hand may still have them.
        question = row.get("question", row.get("prompt"))
        answer = row.get("answer", row.get("completion"))
        if isinstance(question, str) and isinstance(answer, str):
            return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        raise ValueError('no "messages" list')
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" is not a non-empty list')
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {index} has role {role!r}, not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {index} has no text content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message to learn from")
    return out


def training_device(requested: str) -> str:
    """`cuda` or `cpu`: what the runner was told, `auto` meaning a GPU when there is one."""
    if requested in ("cpu", "cuda"):
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def axolotl_config(model_name: str, data_path: Path, workdir: Path, params: TrainingParams,
                   settings: TrainingSettings, *, device: str, quantized: bool) -> dict[str, Any]:
    """The axolotl YAML config as a dict: LoRA (QLoRA when quantized) on conversations in `messages`."""
    cfg: dict[str, Any] = {
        "base_model": model_name,
        "plugins": [PLUGIN_NAME],
        "datasets": [{"path": str(data_path), "ds_type": "json", "type": "chat_template",
                      "field_messages": "messages"}],
        # The model's own template, so the adapter sees prompts as inference will build them.
        "chat_template": "tokenizer_default_fallback_chatml",
        "dataset_prepared_path": str(workdir / "prepared"),
        "output_dir": str(workdir / "out"),
        "val_set_size": 0,
        "sequence_len": settings.sequence_len,
        "sample_packing": False,
        "adapter": "qlora" if quantized else "lora",
        "lora_r": params.lora_r,
        "lora_alpha": params.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "lora_target_linear": True,
        "micro_batch_size": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "num_epochs": params.num_epochs,
        "learning_rate": params.learning_rate,
        "lr_scheduler": "cosine",
        "warmup_ratio": settings.warmup_ratio,
        "seed": params.seed,
        "logging_steps": 1,  # every step's loss reaches the progress plugin
        "save_strategy": "no",  # no checkpoints: the final adapter is all we keep
        "dataset_processes": 1,
        "dataloader_num_workers": 0,
    }
    if params.max_steps is not None:
        cfg["max_steps"] = params.max_steps
    if device == "cuda":
        cfg.update({"bf16": "auto", "tf32": False, "gradient_checkpointing": True,
                    "optimizer": "paged_adamw_8bit" if quantized else "adamw_torch"})
        if quantized:
            cfg["load_in_4bit"] = True
        if importlib.util.find_spec("flash_attn") is not None:
            cfg["flash_attention"] = True
        else:
            cfg["sdp_attention"] = True
    else:
        # axolotl's fused LoRA kernels and half precision assume CUDA.
        cfg.update({"bf16": False, "fp16": False, "tf32": False, "flash_attention": False,
                    "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
                    "optimizer": "adamw_torch"})
    return cfg


def _dump_yaml(cfg: dict[str, Any]) -> str:
    import yaml  # axolotl's own dependency

    return yaml.safe_dump(cfg, sort_keys=False)


def training_env(progress_path: Path, device: str) -> dict[str, str]:
    """The subprocess's environment: quiet, offline unless the operator said otherwise, plugin importable."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env[PROGRESS_ENV] = str(progress_path)
    env[PARENT_ENV] = str(os.getpid())  # the training exits if this runner dies without stopping it
    package_root = str(Path(__file__).resolve().parents[2])  # where `runner` is importable from
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run must not wander onto a GPU
    return env


def run_axolotl(cfg_path: Path, workdir: Path, report: Report, *, device: str,
                task_id: int) -> tuple[int, float | None]:
    """Run axolotl to the end, reporting each step; (steps, final loss). Stops it if the task must stop."""
    progress_path = workdir / "progress.jsonl"
    log_path = workdir / "axolotl.log"
    command = [sys.executable, "-m", "axolotl.cli.train", str(cfg_path)]
    reader = ProgressReader(progress_path)
    steps, loss = 0, None
    started = time.monotonic()
    with log_path.open("wb") as log:
        # Its own process group, so a stop reaches any worker processes it forks too.
        proc = subprocess.Popen(command, cwd=workdir, env=training_env(progress_path, device), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    logger.info("task %s: axolotl started (pid %s)", task_id, proc.pid)
    try:
        while True:
            finished = proc.poll() is not None
            for record in reader.read():  # after poll(), so the last lines written are read too
                if record.get("event") == "begin":
                    report.progress(0, int(record.get("total") or 0), message="training")
                elif record.get("event") == "step":
                    steps, loss = int(record["step"]), record.get("loss")
                    rewards = {k: record[k] for k in ("reward_margin", "reward_accuracy") if k in record}
                    report.progress(steps, int(record.get("total") or 0), message="training", loss=loss, **rewards)
            if finished:
                break
            report.check()
            time.sleep(POLL_SECONDS)
    except BaseException:
        stop_process(proc, task_id)
        raise
    if proc.returncode != 0:
        tail = log_tail(log_path)
        logger.error("task %s: axolotl exited with %s:\n%s", task_id, proc.returncode, tail)
        # The last line is usually the exception: first, where a truncated error still shows it.
        raise FinetuneError(f"axolotl training failed (exit status {proc.returncode}): {tail.splitlines()[-1]}\n"
                            f"last lines of its log:\n{tail}")
    logger.info("task %s: axolotl finished %d steps in %.1fs, loss %s", task_id, steps,
                time.monotonic() - started, loss)
    return steps, loss


def stop_process(proc: subprocess.Popen, task_id: int) -> None:
    """SIGTERM the training's process group, SIGKILL it if it is still there after STOP_SECONDS."""
    if proc.poll() is not None:
        return
    logger.info("task %s: stopping axolotl (pid %s)", task_id, proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        logger.warning("task %s: axolotl ignored SIGTERM; killing it", task_id)
    # Whatever is left of the group (the leader, or children it forked) goes now.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class ProgressReader:
    """Complete JSON lines appended to a file since the last read (the file may not exist yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        """The records written since the last call; a half-written last line waits for the next call."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        records = []
        for line in lines:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    logger.warning("unreadable progress line: %r", line[:200])
        return records


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last meaningful lines of axolotl's log: progress-bar redraws and blank lines left out."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    kept = [line.rstrip() for line in text.replace("\r", "\n").split("\n")
            if line.strip(" ^~\t") and not _is_progress_bar(line)]  # no blank lines or traceback carets
    return "\n".join(kept[-lines:]) or "(empty log)"


def _is_progress_bar(line: str) -> bool:
    return "|" in line and ("it/s]" in line or "s/it]" in line or "examples/s]" in line)


def collect_adapter(output_dir: Path, dest: Path) -> Path:
    """Copy just the adapter's files out of axolotl's output directory; FinetuneError if one is missing."""
    missing = [name for name in ADAPTER_FILES if not (output_dir / name).is_file()]
    if missing:
        raise FinetuneError(f"axolotl finished but wrote no {', '.join(missing)} in {output_dir}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(output_dir / name, dest / name)
    return dest
