"""A database outage is a 503 with Retry-After (OpenAI-shaped on /v1), logged once when it starts and once
when it ends, and /healthz names the dependency that is down.

The outage is real: a throwaway PostgreSQL cluster of this test's own, stopped and started again (the
server on 5432 is shared and never stopped).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helix_api.accounts.auth import create_runner_token, create_user
from helix_api.app import create_app
from helix_api.ops.schema_version import upgrade
from tests.conftest import TEXT_MODEL, bearer, database_of

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@dataclass
class Cluster:
    """A PostgreSQL cluster in a temporary directory, owned by this test."""

    bindir: Path
    data: Path
    port: int
    owner: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.owner, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._ctl("-l", str(self.data.parent / "log"), "-w", "-o",
                  f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.data.parent}",
                  "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL, running; as scripts/with-postgres.sh makes one."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("no initdb on this machine: cannot make a PostgreSQL to stop and start")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="helix-outage-"))
    owner: list[str] = []
    if os.getuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "nobody")
        owner = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*owner, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "-A", "trust"],
                   check=True, capture_output=True, timeout=120)
    made = Cluster(bindir, root / "data", port, owner)
    made.start()
    try:
        yield made
    finally:
        try:
            made.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped by the test
        shutil.rmtree(root, ignore_errors=True)


def test_an_outage_is_503_logged_once_and_over_when_the_database_is_back(cluster, tmp_path, caplog):
    upgrade(cluster.url)
    app = create_app({"DATABASE_URL": cluster.url, "DATA_DIR": str(tmp_path), "AUTO_UPGRADE": False,
                      "AUTH_CACHE_SECONDS": 0})
    db = database_of(app)
    with db.orm_write() as session:
        _, key = create_user(session, "alice")
        token = create_runner_token(session, "runner")
    user, runner = bearer(key), bearer(token)
    client = app.test_client()
    assert client.get("/api/v1/sessions", headers=user).status_code == 200
    assert client.get("/healthz").json == {"status": "ok", "database": "ok", "files": "ok"}

    cluster.stop()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            native = client.get("/api/v1/sessions", headers=user)
            assert native.status_code == 503 and native.headers["Retry-After"].isdigit()
            assert native.json["error"] == "database_unavailable" and native.json["message"]
        chat = client.post("/v1/chat/completions", headers=user,
                           json={"model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503 and chat.headers["Retry-After"] and chat.headers["x-should-retry"] == "true"
        assert chat.json["error"]["type"] == "server_error" and chat.json["error"]["code"] == "database_unavailable"
        claim = client.get(f"/api/v1/worker/task?model_name={TEXT_MODEL}", headers=runner)
        assert claim.status_code == 503
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json["down"] == ["database"]
        assert health.json["files"] == "ok" and health.json["database"] != "ok"

        cluster.start()
        assert client.get("/api/v1/sessions", headers=user).status_code == 200
        assert client.get("/healthz").status_code == 200
    messages = [r.getMessage() for r in caplog.records]
    assert sum("database unreachable" in m for m in messages) == 1, messages
    assert sum("database reachable again" in m for m in messages) == 1, messages
    assert not [r for r in caplog.records if r.exc_info], "no traceback for an outage"
    assert sum("LISTEN connection lost" in m for m in messages) <= 1, messages
    db.dispose()
