"""`make demo`: the API on embedded SQLite, a text runner and an image runner, a streamed chat and an image.

With no model named it builds a tiny Mistral and a tiny SDXL offline (random weights, real architectures)
under the data directory on first use: their output is gibberish and noise, but every step is the real
one. With a GPU and the hub, `make demo ARGS="--model mistralai/Mistral-7B-Instruct-v0.1"` serves the
real model the same way. Afterwards the API and runners keep running (Ctrl-C stops them);
HELIX_DEMO_EXIT=1 stops after the tour instead, which is how the test suite runs it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TURNS = ("Hello! Who are you?", "Tell me a story about a dragon who learned to paint.")
PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _helix(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run([str(BIN / "helix"), "--log-level", "WARNING", *args], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def _events(base: str, headers: dict[str, str], session_id: int, after: int) -> Iterator[dict]:
    """The session's events after `after`, as they happen (Server-Sent Events)."""
    with requests.get(f"{base}/api/v1/sessions/{session_id}/events", headers={**headers, "Last-Event-ID": str(after)},
                      stream=True, timeout=(5, 600)) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if line and line.startswith("data: "):
                yield json.loads(line[len("data: "):])


def _follow(base: str, headers: dict[str, str], session: dict) -> dict:
    """Print a reply as it streams (tokens, or progress per step) until it ends; the session afterwards."""
    reply_id = session["interactions"][-1]["id"]
    for event in _events(base, headers, session["id"], session["last_event_seq"] - 1):
        if event.get("interaction_id") != reply_id:
            continue
        if event["kind"] == "token":
            print(event["text"], end="", flush=True)
        elif event["kind"] == "progress":
            print(f"\r    step {event['step']}/{event['total']}", end="", flush=True)
        elif event["kind"] == "state" and event["state"] in ("complete", "error", "cancelled"):
            print()
            break
    shown = requests.get(f"{base}/api/v1/sessions/{session['id']}", headers=headers, timeout=10)
    shown.raise_for_status()
    return shown.json()


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
            logs: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    log = (logs / f"runner-{kind}.log").open("w")
    return subprocess.Popen([str(BIN / "helix-runner"), "--backend", backend, "--api-url", base, "--mode", "create",
                             "--type", kind, "--model-name", model, "--wait", "10", *extra],
                            env={**env, "HELIX_RUNNER_TOKEN": token}, stdout=log, stderr=subprocess.STDOUT)


def _openai_tour(base: str, key: str, model: str, max_new_tokens: int) -> None:
    """The same chat through the official OpenAI client, streamed."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=key)
    question = "Say hello through the OpenAI client."
    print(f"\n[you, via the openai package] {question}\n[{Path(model).name}] ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_new_tokens, seed=0,
        stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        usage = chunk.usage or usage
    print(f"\n    (usage {usage.model_dump() if usage else None})")


@click.command()
@click.option("--model", default=None, metavar="ID_OR_PATH",
              help="Text model to serve (hub id or path). [default: a tiny Mistral built offline]")
@click.option("--image-model", default=None, metavar="ID_OR_PATH",
              help="SDXL pipeline to serve. [default: a tiny SDXL built offline]")
@click.option("--max-new-tokens", default=48, show_default=True, type=int, help="Length of each chat reply.")
def main(model: str | None, image_model: str | None, max_new_tokens: int) -> None:
    """Start Helix with a text and an image runner, chat for two turns and draw one image."""
    env = dict(os.environ)
    env.setdefault("HELIX_DATA_DIR", str(ROOT / ".helix-data"))
    data = Path(env["HELIX_DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    if model is None or image_model is None:
        from runner.tiny.mistral import build_tiny_mistral
        from runner.tiny.sdxl import build_tiny_sdxl

        print(f"==> tiny models (random weights, built offline once) under {data / 'models'}")
        model = model or str(build_tiny_mistral(data / "models" / "tiny-mistral"))
        image_model = image_model or str(build_tiny_sdxl(data / "models" / "tiny-sdxl"))
    env["HELIX_MODELS"] = ",".join(filter(None, [env.get("HELIX_MODELS"), f"text:{model}", f"image:{image_model}"]))
    port = int(env.get("HELIX_DEMO_PORT") or _free_port())
    base = f"http://127.0.0.1:{port}"
    print(f"==> database: SQLite in {data}")
    print("==> " + _helix("db", "upgrade", env=env))
    api_log = (data / "api.log").open("w")
    processes = [subprocess.Popen([str(BIN / "helix"), "serve", "--port", str(port)], env=env, stdout=api_log,
                                  stderr=subprocess.STDOUT)]
    try:
        _wait_healthy(base, processes[0])
        # An admin, so the web app's admin page opens for the demo user too.
        key = _helix("users", "create", f"demo-{int(time.time())}", "--admin", env=env)
        token = _helix("runner-token", "create", "--name", "demo", env=env)
        headers = {"Authorization": f"Bearer {key}"}
        print(f"==> API at {base}; runners: text on {model}, image on {image_model} (logs in {data})")
        processes.append(_runner("text", "mistral", model, base, token, env, data))
        processes.append(_runner("image", "sdxl", image_model, base, token, env, data))

        params = {"max_new_tokens": max_new_tokens, "seed": 0, "temperature": 0.8, "do_sample": True}
        session = None
        for turn in TURNS:
            print(f"\n[you] {turn}\n[{Path(model).name}] ", end="", flush=True)
            if session is None:
                created = requests.post(f"{base}/api/v1/sessions", headers=headers, timeout=10, json={
                    "type": "text", "model_name": model, "message": turn, "params": params})
            else:
                created = requests.post(f"{base}/api/v1/sessions/{session['id']}/messages", headers=headers,
                                        timeout=10, json={"message": turn, "params": params})
            created.raise_for_status()
            session = _follow(base, headers, created.json())
            reply = session["interactions"][-1]
            if reply["state"] != "complete":
                raise click.ClickException(f"the reply ended {reply['state']}: {reply['error']}")
            print(f"    ({reply['result']['finish_reason']}; usage {reply['result']['usage']})")

        print(f"\n[you] draw: {PROMPT}")
        created = requests.post(f"{base}/api/v1/sessions", headers=headers, timeout=10, json={
            "type": "image", "model_name": image_model, "message": PROMPT,
            "params": {"width": 64, "height": 64, "num_inference_steps": 4, "seed": 0}})
        created.raise_for_status()
        image = _follow(base, headers, created.json())["interactions"][-1]
        if image["state"] != "complete" or not image["files"]:
            raise click.ClickException(f"the image ended {image['state']}: {image['error']}")
        url = base + image["files"][0]["url"]
        print(f"==> the PNG: {url}")
        _openai_tour(base, key, model, max_new_tokens)
        print(f"""
==> The API runs at {base}. Your demo API key:
{key}

In a browser: {base}/ (sign in with the key; the admin page is {base}/admin).
From any OpenAI client: OpenAI(base_url="{base}/v1", api_key="{key}").

Try it:
  curl -s -H 'Authorization: Bearer {key}' {base}/api/v1/sessions
  curl -s -H 'Authorization: Bearer {key}' -o image.png {url}
  curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
       -d '{{"message": "And then?"}}' {base}/api/v1/sessions/{session['id']}/messages
  curl -N -H 'Authorization: Bearer {key}' {base}/api/v1/sessions/{session['id']}/events
""")
        if env.get("HELIX_DEMO_EXIT") == "1":
            return
        print("Ctrl-C stops the API and the runners.")
        processes[0].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(processes):  # runners first: the API answers their last calls
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
