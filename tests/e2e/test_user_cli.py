"""The user CLI against real processes: `helix chat` in a pseudo-terminal, `helix image`, `helix finetune --follow`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pexpect
import pytest

from tests.conftest import IMAGE_MODEL, TEXT_ALIAS, TEXT_MODEL
from tests.e2e.processes import REPO, SQLITE_ONLY, ApiServer, base_env, executable

# SQLite only: the CLI speaks HTTP; the API's behaviour on both databases is tested elsewhere.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), SQLITE_ONLY]


def cli_env(server: ApiServer, key: str | None = None) -> dict[str, str]:
    """A user's environment: where the API is and their key, nothing of the server's."""
    return {**base_env(), "HELIX_API_URL": server.url, "HELIX_API_KEY": key or server.api_key, "COLUMNS": "100"}


def helix(server: ApiServer, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
    """Run a user command of `helix` to its end."""
    return subprocess.run([executable("helix"), *args], env=cli_env(server, key), capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_chat_streams_replies_in_a_terminal_and_resumes_its_session(api_server, runner_process):
    server = api_server()
    runner_process(server, "echo")
    chat = pexpect.spawn(executable("helix"), ["chat", TEXT_MODEL], env=cli_env(server), encoding="utf-8",
                         timeout=30, cwd=str(REPO))
    chat.expect_exact("> ")
    chat.sendline("hello from a terminal")
    chat.expect_exact("hello from a terminal\r\n")
    chat.expect_exact("> ")
    chat.sendline("and a second turn")
    chat.expect_exact("and a second turn\r\n")
    chat.expect_exact("> ")
    chat.sendeof()
    chat.expect(r"session (\d+): continue with `helix chat .* --session \d+`")
    session_id = int(chat.match.group(1))
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0

    again = pexpect.spawn(executable("helix"), ["chat", TEXT_MODEL, "--session", str(session_id)],
                          env=cli_env(server), encoding="utf-8", timeout=30, cwd=str(REPO))
    again.expect_exact(f"session {session_id} ({TEXT_ALIAS}), 4 turns so far")  # the model as users see it
    again.expect_exact("> ")
    again.sendline("third turn here")
    again.expect_exact("third turn here\r\n")
    again.expect_exact("> ")
    again.sendeof()
    again.expect(pexpect.EOF)
    turns = server.sql("SELECT creator, state, output FROM interactions WHERE session_id = :s ORDER BY id",
                       s=session_id)
    assert [(c, s) for c, s, _ in turns] == [("user", "complete"), ("assistant", "complete")] * 3
    assert turns[-1][2] == "third turn here"


def test_image_is_written_to_the_file_named(api_server, runner_process, tmp_path: Path):
    server = api_server()
    runner_process(server, "png", backend="tests.e2e.cli_doubles:PngBackend", mode="Create", type_="Image",
                   model_name=IMAGE_MODEL)
    out = tmp_path / "fox.png"
    done = helix(server, "image", IMAGE_MODEL, "a red fox in the snow", "-o", str(out), "--steps", "4")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"wrote {out}" in done.stdout
    assert "4/4" in done.stderr  # the denoising bar reached its end


def test_finetune_follows_training_to_the_end_then_says_how_to_chat(api_server, runner_process, tmp_path: Path):
    server = api_server(min_text_examples=2)
    runner_process(server, "trainer", backend="tests.e2e.cli_doubles:PngBackend", mode="Finetune")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {n}?", "answer": f"It is {n}."}) + "\n"
                            for n in range(3)))
    done = helix(server, "finetune", TEXT_MODEL, str(data), "--steps", "5", "--follow")
    assert done.returncode == 0, done.stderr
    session_id = int(re.search(r"fine-tune session (\d+) queued", done.stdout).group(1))
    # tqdm's bar: one line per step it drew, ending at 5/5 with the last loss.
    assert "5/5" in done.stderr and "loss=0.2000" in done.stderr, done.stderr
    assert f"helix chat {TEXT_MODEL} --session {session_id}" in done.stdout
    assert server.sql("SELECT mode FROM sessions WHERE id = :s", s=session_id) == [("create",)]


def test_api_errors_are_one_line_without_a_traceback(api_server):
    server = api_server()
    missing = helix(server, "sessions", "show", "999")
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("Error: ") and "(404 not_found)" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr
    bad = helix(server, "usage", "--from", "yesterday")
    assert bad.returncode == 1 and "'from'" in bad.stderr and "(400 invalid_field)" in bad.stderr
    refused = helix(server, "sessions", "list", key="hx_not-a-key")
    assert refused.returncode == 1 and "(401 unauthorized)" in refused.stderr
    listed = helix(server, "usage")
    assert listed.returncode == 0 and listed.stdout.splitlines()[-1].split()[:2] == ["total", "0"]


def test_chat_keeps_typed_ahead_input_out_of_a_streaming_reply_and_usage_lines_up(api_server, runner_process):
    server = api_server()
    runner_process(server, "slow", backend="tests.e2e.cli_doubles:SlowEchoBackend")
    chat = pexpect.spawn(executable("helix"), ["chat", TEXT_MODEL], env=cli_env(server), encoding="utf-8",
                         timeout=30, cwd=str(REPO))
    chat.expect_exact("> ")
    chat.sendline("one two three four five six")
    chat.expect_exact("one two three four five six\r\n")  # the terminal's echo of the line typed
    chat.expect_exact("one ")  # the reply streams (a word every 0.2 s): type ahead now
    chat.sendline("typed ahead")
    chat.expect_exact("> ")
    # The reply reads as it was sent, with nothing typed echoed into it.
    assert "typed ahead" not in chat.before and "six" in chat.before, chat.before
    chat.sendline("next turn")
    chat.expect_exact("next turn\r\n")
    chat.expect_exact("> ")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    # What was typed during the reply was dropped, not sent unseen at the next prompt.
    messages = [m for (m,) in server.sql("SELECT message FROM interactions WHERE creator = 'user' ORDER BY id")]
    assert messages == ["one two three four five six", "next turn"]

    listed = helix(server, "usage")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[2:]]
    assert rows[-1][0] == "total" and rows[-1][1] == "2"
    for row in rows:  # one precision per column: whole counts, then seconds to one decimal
        assert all(re.fullmatch(r"[\d,]+", figure) for figure in row[1:5]), listed.stdout
        assert all(re.fullmatch(r"[\d,]+\.\d", figure) for figure in row[5:7]), listed.stdout
