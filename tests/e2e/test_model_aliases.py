"""A model alias end to end: `helix serve` offering a model by alias, a runner whose job URL names the alias,
the official `openai` client and the user CLI naming it too."""

from __future__ import annotations

import pytest

from tests.e2e.client import echo_of, openai_client
from tests.e2e.processes import ApiServer
from tests.e2e.test_user_cli import helix

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FULL_NAME, ALIAS = "org/echo-model", "echo"


def test_a_runner_url_the_openai_client_and_the_cli_all_name_a_model_by_its_alias(api_server, runner_process):
    server: ApiServer = api_server(models=f"text:{ALIAS}={FULL_NAME}")
    runner = runner_process(server, "by-alias", model_name=ALIAS)
    # The runner learns the full name before loading, and claims by it.
    runner.wait_for_log(f"claiming mode=create type=text model_name={FULL_NAME}", 30, "the runner to claim")
    assert f"alias of {FULL_NAME}" in runner.log_text()

    client = openai_client(server)
    ids = {m.id for m in client.models.list()}
    assert ALIAS in ids and FULL_NAME not in ids
    reply = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hello by alias"}])
    assert reply.choices[0].message.content == echo_of("hello by alias") and reply.model == ALIAS
    assert server.sql("SELECT model_name FROM tasks") == [(FULL_NAME,)]

    listed = helix(server, "sessions", "list")
    assert listed.returncode == 0, listed.stderr
    assert f" {ALIAS} " in listed.stdout and FULL_NAME not in listed.stdout
