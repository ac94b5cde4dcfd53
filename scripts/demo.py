"""`make demo`: migrate the embedded SQLite database, start the API, make a demo user, show a session.

Runs the API in the foreground afterwards (Ctrl-C stops it). HELIX_DEMO_EXIT=1 stops after the tour
instead, which is how the test suite runs it. The model issues extend this to start runners.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "mistralai/Mistral-7B-Instruct-v0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _helix(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run([str(BIN / "helix"), "--log-level", "WARNING", *args], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> int:
    env = dict(os.environ)
    env.setdefault("HELIX_DATA_DIR", str(ROOT / ".helix-data"))
    port = int(env.get("HELIX_DEMO_PORT") or _free_port())
    base = f"http://127.0.0.1:{port}"
    print(f"==> database: SQLite in {env['HELIX_DATA_DIR']}")
    print("==> " + _helix("db", "upgrade", env=env))
    server = subprocess.Popen([str(BIN / "helix"), "serve", "--port", str(port)], env=env)
    try:
        for _ in range(100):
            try:
                if requests.get(f"{base}/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            print("the API did not come up", file=sys.stderr)
            return 1
        key = _helix("users", "create", f"demo-{int(time.time())}", env=env)
        headers = {"Authorization": f"Bearer {key}"}
        created = requests.post(f"{base}/api/v1/sessions", headers=headers, timeout=10, json={
            "mode": "create", "type": "text", "model_name": MODEL, "message": "Hello, Helix!"})
        created.raise_for_status()
        session = created.json()
        reply = session["interactions"][-1]
        print(f"==> session {session['id']} created; its reply is {reply['state']}, "
              f"position {reply.get('queue_position')} in the {MODEL} queue (no runner is attached yet)")
        print(json.dumps(session, indent=2))
        print(f"""
==> The API runs at {base}. Your demo API key:
{key}

Try it:
  curl -s -H 'Authorization: Bearer {key}' {base}/api/v1/sessions
  curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
       -d '{{"mode": "create", "type": "text", "model_name": "{MODEL}", "message": "Hi!"}}' \\
       {base}/api/v1/sessions
  curl -N -H 'Authorization: Bearer {key}' {base}/api/v1/sessions/{session['id']}/events
""")
        if env.get("HELIX_DEMO_EXIT") == "1":
            return 0
        print("Ctrl-C stops the API.")
        server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.terminate()
        server.wait(timeout=15)


if __name__ == "__main__":
    sys.exit(main())
