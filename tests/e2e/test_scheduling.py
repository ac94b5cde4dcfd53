"""The fleet's scheduling rules through real processes: one runner of several kinds, warm adapters, fair shares.

`helix serve` and `helix-runner --kind create:text:M --kind finetune:text:M` processes with a backend that
echoes chats, 'trains' adapters of its own and counts its adapter loads (tests/e2e/text_doubles.py).
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from sqlalchemy import text

from tests.conftest import TEXT_MODEL
from tests.e2e.client import create_finetune, create_session, echo_of, wait_for_reply
from tests.e2e.processes import SQLITE_ONLY, ApiServer, RunnerProcess, wait_for

pytestmark = pytest.mark.timeout(120)

BACKEND = "tests.e2e.text_doubles:ChatAndTuneBackend"
BOTH_KINDS = ("--kind", f"create:text:{TEXT_MODEL}", "--kind", f"finetune:text:{TEXT_MODEL}")
LOADED = re.compile(r"adapter \S+ loaded")


def chats() -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart part of a small chats.jsonl to 'train' on."""
    lines = [{"messages": [{"role": "user", "content": f"what is {n}?"}, {"role": "assistant", "content": f"{n}"}]}
             for n in range(10)]
    return [("files", ("chats.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode(),
                       "application/jsonl"))]


def fine_tunes(server: ApiServer, count: int) -> list[str]:
    """`count` completed fine-tunes of the text model, as the `ft:` model ids a chat names them by."""
    sessions = [create_finetune(server, TEXT_MODEL, chats()) for _ in range(count)]
    for session in sessions:
        assert wait_for_reply(server, server.user, session["id"], 60)["state"] == "complete"
    ids = [m["id"] for m in requests.get(f"{server.url}/v1/models", headers=server.user, timeout=30).json()["data"]]
    tuned = [model for model in ids if model.startswith("ft:")
             and int(model.rsplit(":", 1)[1]) in {session["id"] for session in sessions}]
    assert len(tuned) == count, ids
    return tuned


def chat(server: ApiServer, model: str, message: str) -> str:
    """A chat completion on `model` (an `ft:` id carries its adapter), waited for; the reply's text."""
    response = requests.post(f"{server.url}/v1/chat/completions", headers=server.user, timeout=60,
                             json={"model": model, "messages": [{"role": "user", "content": message}]})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def adapter_loads(runners: list[RunnerProcess]) -> int:
    """Adapter loads the runners logged so far."""
    return sum(len(LOADED.findall(runner.log_text())) for runner in runners)


def test_one_runner_of_both_kinds_completes_a_chat_and_a_fine_tune(api_server, runner_process):
    server = api_server()
    runner = runner_process(server, "both", backend=BACKEND, extra=BOTH_KINDS)
    session = create_session(server, server.user, "hello from the chat")
    tune = create_finetune(server, TEXT_MODEL, chats())
    assert wait_for_reply(server, server.user, session["id"], 30)["output"] == echo_of("hello from the chat")
    assert wait_for_reply(server, server.user, tune["id"], 30)["state"] == "complete"
    # One process took both, and told the API it serves both queues.
    assert set(server.sql("SELECT DISTINCT runner FROM tasks")) == {("both",)}
    ((kinds,),) = server.sql("SELECT kinds FROM runners WHERE name = 'both'")
    kinds = json.loads(kinds) if isinstance(kinds, str) else kinds
    assert sorted(kind["mode"] for kind in kinds) == ["create", "finetune"]
    # The fine-tune's adapter works in a chat through the same runner.
    (model,) = fine_tunes(server, 1)
    assert chat(server, model, "and with the adapter") == echo_of("and with the adapter")
    assert LOADED.search(runner.log_text())


ROUNDS = 8


def _rounds(server: ApiServer, models: list[str], rounds: int) -> None:
    """`rounds` times: one chat per adapter at once, all waited for (a steady load of adapter work)."""
    for number in range(rounds):
        with ThreadPoolExecutor(len(models)) as pool:
            replies = list(pool.map(lambda model, n=number: chat(server, model, f"round {n}"), models))
        assert replies == [echo_of(f"round {number}")] * len(models)


@pytest.mark.slow
@pytest.mark.timeout(240)
@SQLITE_ONLY
def test_warm_routing_keeps_each_adapter_on_the_runner_that_holds_it(api_server, runner_process):
    # Each runner holds one adapter at a time; with two adapters and two runners, the one that holds an
    # adapter should get its chats. Without the warm wait, whichever runner polls first takes a chat.
    server = api_server(warm_wait_seconds=1)
    env = {"HELIX_TEST_ADAPTER_LOAD_SECONDS": "0.3", "HELIX_TEST_ADAPTER_CAPACITY": "1"}
    runners = [runner_process(server, f"warm-{n}", backend=BACKEND, extra=BOTH_KINDS, env=env) for n in range(2)]
    models = fine_tunes(server, 2)
    _rounds(server, models, 2)  # each runner picks up an adapter
    before = adapter_loads(runners)
    _rounds(server, models, ROUNDS)
    warm = adapter_loads(runners) - before

    server.stop()
    server.env["HELIX_WARM_WAIT_SECONDS"] = "0"
    server.start()
    before = adapter_loads(runners)
    _rounds(server, models, ROUNDS)
    cold = adapter_loads(runners) - before

    tasks = ROUNDS * len(models)
    # With warm routing a chat waits for the runner that holds its adapter: few loads, whatever the polls'
    # timing. Without it, about every other chat lands on the runner holding the other adapter.
    assert warm <= tasks // 4, (warm, cold)
    assert cold > warm, (warm, cold)


@pytest.mark.slow
@SQLITE_ONLY
@pytest.mark.parametrize("slots", [2, 1])
def test_a_second_user_is_served_before_the_first_users_backlog_ends(api_server, runner_process, slots):
    server = api_server()
    bob = {"Authorization": f"Bearer {server.create_user('bob')}"}
    alice_ids = [create_session(server, server.user, f"alice {n}", sleep=0.1)["id"] for n in range(20)]
    # One runner, the seed's single-kind URL: the echo double holds `slots` chats at once.
    runner_process(server, "one", extra=("--max-parallel", str(slots)))
    wait_for(lambda: server.sql("SELECT count(*) FROM tasks WHERE status = 'complete'")[0][0] >= 1, 30,
             "the runner to start on alice's backlog")
    bob_ids = [create_session(server, bob, f"bob {n}", sleep=0.1)["id"] for n in range(2)]
    for session_id in bob_ids:
        wait_for_reply(server, bob, session_id, 60)
    for session_id in alice_ids:
        wait_for_reply(server, server.user, session_id, 60)
    finished = {session_id: ended for session_id, ended in
                server.sql("SELECT session_id, finished_at FROM tasks WHERE status = 'complete'")}
    alice_order = sorted(finished[s] for s in alice_ids)
    # Fair shares: bob has nothing running, so his tasks go before alice's queued ones.
    assert max(finished[s] for s in bob_ids) < alice_order[9], _order(finished, bob_ids)


def _order(finished: dict[int, Any], bob_ids: list[int]) -> list[str]:
    """Who finished when, for a failure's message."""
    return [("bob" if s in bob_ids else "alice") for s, _ in sorted(finished.items(), key=lambda item: item[1])]


@pytest.mark.slow
@SQLITE_ONLY
def test_a_reserved_runner_starts_a_fine_tune_at_once_under_a_steady_chat_load(api_server, runner_process):
    server = api_server()
    with server.engine.begin() as conn:
        conn.execute(text("INSERT INTO reservations (model_name, runners, updated_at) VALUES (:m, 1, :now)"),
                     {"m": TEXT_MODEL, "now": datetime.now(UTC).replace(tzinfo=None)})
    for n in range(2):
        runner_process(server, f"pool-{n}", backend=BACKEND, extra=BOTH_KINDS)
    stop = threading.Event()

    def chats_keep_coming() -> None:
        # More chats than two runners finish: the queue never empties while the fine-tune waits.
        while not stop.is_set():
            create_session(server, server.user, "steady load", sleep=0.3)
            stop.wait(0.1)

    load = threading.Thread(target=chats_keep_coming)
    load.start()
    try:
        wait_for(lambda: server.sql("SELECT count(*) FROM tasks WHERE status = 'complete'")[0][0] >= 4, 30,
                 "the chats to flow")
        tune = create_finetune(server, TEXT_MODEL, chats())
        assert wait_for_reply(server, server.user, tune["id"], 30)["state"] == "complete"
    finally:
        stop.set()
        load.join(30)
    ((queued_at, claimed_at),) = server.sql("SELECT queued_at, claimed_at FROM tasks WHERE session_id = :s",
                                            s=tune["id"])
    # One runner stays idle for fine-tuning: the fine-tune waits at most for a poll, not for the chats.
    waited = datetime.fromisoformat(str(claimed_at)) - datetime.fromisoformat(str(queued_at))
    assert waited.total_seconds() < 3, (queued_at, claimed_at)
    assert server.sql("SELECT count(*) FROM tasks WHERE status = 'queued' AND mode = 'create'")[0][0] > 0


def test_over_the_queued_limit_a_real_server_answers_429_and_stores_nothing(api_server):
    server = api_server(max_queued_per_user=2)
    for n in range(2):
        create_session(server, server.user, f"queued {n}")
    before = server.sql("SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM interactions), "
                        "(SELECT count(*) FROM tasks)")[0]
    refused = requests.post(f"{server.url}/api/v1/sessions", headers=server.user, timeout=30,
                            json={"mode": "create", "type": "text", "model_name": TEXT_MODEL, "message": "one more"})
    assert refused.status_code == 429 and refused.json()["error"] == "too_many_queued", refused.text
    assert int(refused.headers["Retry-After"]) > 0
    openai = requests.post(f"{server.url}/v1/chat/completions", headers=server.user, timeout=30,
                           json={"model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert openai.status_code == 429 and openai.json()["error"]["type"] == "rate_limit_error", openai.text
    after = server.sql("SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM interactions), "
                       "(SELECT count(*) FROM tasks)")[0]
    assert tuple(after) == tuple(before)


@pytest.mark.slow
@SQLITE_ONLY
def test_a_new_session_ages_past_steady_continue_work(api_server, runner_process):
    server = api_server(ageing_seconds=1)
    chatters = [create_session(server, server.user, f"chat {n}", sleep=0.3)["id"] for n in range(4)]
    runner_process(server, "one")  # one slot: continue work (priority 0) always waits, so without ageing
    stop = threading.Event()       # a new session (priority 1) would wait for as long as the chats go on

    def keep_chatting(session_id: int) -> None:
        while not stop.is_set():
            wait_for_reply(server, server.user, session_id, 60)
            if stop.is_set():
                return
            response = requests.post(f"{server.url}/api/v1/sessions/{session_id}/messages", headers=server.user,
                                     timeout=30, json={"message": "and then?", "params": {"sleep": 0.3}})
            assert response.status_code == 201, response.text

    with ThreadPoolExecutor(len(chatters)) as pool:
        loops = [pool.submit(keep_chatting, session_id) for session_id in chatters]
        try:
            wait_for(lambda: server.sql("SELECT count(*) FROM tasks WHERE status = 'complete'")[0][0] >= 6, 30,
                     "the chats to flow")
            newcomer = create_session(server, server.user, "hello", sleep=0.3)
            wait_for_reply(server, server.user, newcomer["id"], 30)
        finally:
            stop.set()
        for loop in loops:
            loop.result(timeout=60)
    ((queued_at, claimed_at),) = server.sql("SELECT queued_at, claimed_at FROM tasks WHERE session_id = :s",
                                            s=newcomer["id"])
    queued, claimed = (datetime.fromisoformat(str(v)) for v in (queued_at, claimed_at))
    assert (claimed - queued).total_seconds() < 4, (queued, claimed)
    # It went before continue work that was waiting when it was claimed.
    passed = server.sql("SELECT count(*) FROM tasks WHERE priority = 0 AND queued_at < :c "
                        "AND (claimed_at IS NULL OR claimed_at > :c)", c=claimed_at)[0][0]
    assert passed > 0
