"""The `helix` command: serve the API, migrate the database, make users and runner tokens, see tasks and runners."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import click

from helix_api.cli import user as user_cli
from helix_api.config import load_settings
from helix_api.vocabulary import TaskStatus

# Only click, the settings and the vocabulary at import time: `helix serve`'s process becomes
# gunicorn's master, which should not carry SQLAlchemy and Alembic in memory for its whole life.
logger = logging.getLogger(__name__)
TASK_STATUSES = tuple(status.value for status in TaskStatus)


def _database(check: bool = True, settings: dict[str, Any] | None = None):
    from helix_api.db import Database
    from helix_api.errors import SchemaOutOfDate
    from helix_api.ops import schema_version as schema

    settings = settings or load_settings()
    database = Database(settings["DATABASE_URL"])
    if check:
        try:
            schema.ensure_current(database.engine, settings["DATABASE_URL"], settings["AUTO_UPGRADE"])
        except SchemaOutOfDate as exc:
            raise click.ClickException(exc.message) from None
    return database


@click.group()
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
def main(log_level: str) -> None:
    """Helix control plane."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Alembic narrates every connection at INFO; its news is the revision we print ourselves.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))


def _check_models(setting: str) -> None:
    """Refuse to serve a HELIX_MODELS with a malformed entry or a clashing or unsafe alias: one clear line,
    before gunicorn forks workers that would each fail with a traceback."""
    from helix_api.catalog import Catalog, CatalogError

    try:
        Catalog.from_setting(setting)
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", type=int, default=None,
              help="Processes (default: 1 on SQLite, which serialises writes anyway; one per two cores on "
              "PostgreSQL, whose server needs cores of its own).")
@click.option("--threads", default=1024, show_default=True, type=int,
              help="Threads per process: each waiting runner (long-poll) or event stream holds one. They "
              "start as they are needed, so a high ceiling costs nothing until runners wait.")
def serve(host: str, port: int, workers: int | None, threads: int) -> None:
    """Serve the API with gunicorn."""
    from gunicorn.app.base import BaseApplication

    # Refuse to start on an old schema before forking anything; a child process does the checking.
    if subprocess.run([sys.executable, "-m", "helix_api.cli.operator", "db", "check"]).returncode != 0:
        raise SystemExit(1)
    settings = load_settings()
    _check_models(settings["MODELS"])
    dialect = "sqlite" if settings["DATABASE_URL"].startswith("sqlite") else "postgresql"
    if workers is None:
        # Each process runs Python on one core at a time and costs ~80 MB; the database server does a
        # large share of every request's work on the other cores (measured in notes.md).
        workers = 1 if dialect == "sqlite" else max(1, (os.cpu_count() or 1) // 2)
    binds = [f"{host}:{port}"] + ([settings["METRICS_BIND"]] if settings["METRICS_BIND"] else [])
    metrics_dir = _metrics_dir()

    class _Server(BaseApplication):
        def load_config(self) -> None:
            # Idle keep-alive connections wait in the worker's selector, not on a thread: room for a
            # fleet of them beside the busy ones.
            for key, value in {"bind": binds, "workers": workers, "child_exit": _child_exit, "threads": threads,
                               "worker_connections": threads + 1000, "worker_class": "gthread",
                               "timeout": 120, "graceful_timeout": 10,
                               "keepalive": 75, "accesslog": None, "errorlog": "-",
                               # Several servers on one machine would fight over one socket path.
                               "control_socket_disable": True}.items():
                self.cfg.set(key, value)

        def load(self):
            from helix_api.app import create_app

            return create_app()

    click.echo(f"Helix API on http://{host}:{port} ({dialect}, {workers} process(es) x {threads} threads)")
    if settings["METRICS_BIND"]:
        click.echo(f"metrics on http://{settings['METRICS_BIND']}/metrics")
    try:
        _Server().run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _metrics_dir() -> str | None:
    """Give gunicorn's workers one folder for their metrics, before any forks; ours to remove, if we made it.

    An operator's own PROMETHEUS_MULTIPROC_DIR is emptied instead: figures of a previous run's
    processes would otherwise be added to this one's.
    """
    own = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if own:
        os.makedirs(own, exist_ok=True)
        for name in os.listdir(own):
            if name.endswith(".db"):
                os.remove(os.path.join(own, name))
        return None
    made = tempfile.mkdtemp(prefix="helix-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made


def _child_exit(server: Any, worker: Any) -> None:
    """A gunicorn worker exited: its live gauges go; its counters stay in the totals."""
    from prometheus_client import multiprocess  # not helix_api.ops.metrics: the master stays free of SQLAlchemy

    multiprocess.mark_process_dead(worker.pid)


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
def check() -> None:
    """Exit non-zero, saying what to run, if the schema is behind (or upgrade the embedded default)."""
    _database().dispose()


@db.command()
@click.option("--revision", default="head", show_default=True)
def upgrade(revision: str) -> None:
    """Apply Alembic revisions up to REVISION."""
    from helix_api.db import Database
    from helix_api.ops import schema_version as schema

    settings = load_settings()
    schema.upgrade(settings["DATABASE_URL"], revision)
    database = Database(settings["DATABASE_URL"])
    click.echo(f"database at revision {schema.current_revision(database.engine)}")
    database.dispose()


@db.command()
def current() -> None:
    """Print the database's revision and the code's head."""
    from helix_api.ops import schema_version as schema

    database = _database(check=False)
    click.echo(f"database: {schema.current_revision(database.engine)}  head: {schema.head_revision()}")


@main.group()
def users() -> None:
    """Users and their API keys."""


@users.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="May see every user's work in admin views.")
def users_create(name: str, admin: bool) -> None:
    """Create user NAME; prints the API key (shown once) as the last line."""
    from sqlalchemy.exc import IntegrityError

    from helix_api.accounts.auth import create_user

    database = _database()
    try:
        with database.orm_write() as session:
            user, key = create_user(session, name, is_admin=admin)
            user_id = user.id
    except IntegrityError:
        raise click.ClickException(f"a user called {name!r} exists already") from None
    click.echo(f"created user {name} (id {user_id}); API key:", err=True)
    click.echo(key)


@users.command("new-key")
@click.argument("name")
def users_new_key(name: str) -> None:
    """Give user NAME another API key; prints it (shown once) as the last line."""
    from sqlalchemy import select

    from helix_api.accounts.auth import create_api_key
    from helix_api.models import User

    database = _database()
    with database.orm_write() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise click.ClickException(f"no user called {name!r}")
        key = create_api_key(session, user)
    click.echo(f"new API key for {name} (prefix {key[:10]}):", err=True)
    click.echo(key)


@users.command("revoke-key")
@click.argument("prefix")
def users_revoke_key(prefix: str) -> None:
    """Revoke the API key starting with PREFIX (its first 10 characters): API calls and browsers signed in
    with it are refused within seconds."""
    from helix_api.accounts.auth import revoke_api_keys

    done = revoke_api_keys(_database(), prefix)
    if not done:
        raise click.ClickException(f"no live API key starts with {prefix[:10]!r}")
    click.echo(f"revoked {done} API key(s) starting with {prefix[:10]}")


# `--queued default`: back to the operator's setting (stored as NULL).
_DEFAULT = object()


class _Limit(click.ParamType):
    """A task limit on the command line: a whole number, 0 for no limit, or `default` (the operator's).

    `zero` says what 0 means; without `default_word` the value is a plain count (a reservation's runners).
    """

    def __init__(self, zero: str = "give 0 for no limit, or 'default' for the operator's",
                 default_word: bool = True) -> None:
        self.zero, self.default_word = zero, default_word
        self.name = "N|default" if default_word else "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or value is _DEFAULT:
            return value
        if self.default_word and str(value).strip().lower() == "default":
            return _DEFAULT
        try:
            number = int(value)
        except (TypeError, ValueError):
            what = "neither a whole number nor 'default'" if self.default_word else "not a whole number"
            self.fail(f"{value!r} is {what}.", param, ctx)
        if number < 0:
            self.fail(f"{number} is negative: {self.zero}.", param, ctx)
        return number


@users.command("limits")
@click.argument("name")
@click.option("--queued", type=_Limit(), default=None,
              help="Tasks NAME may have queued at once: N (0: no limit) or 'default' (HELIX_MAX_QUEUED_PER_USER).")
@click.option("--running", type=_Limit(), default=None,
              help="Tasks NAME may have running at once: N (0: no limit) or 'default' (HELIX_MAX_RUNNING_PER_USER).")
def users_limits(name: str, queued: Any, running: Any) -> None:
    """Show user NAME's task limits and tasks now, or set them with --queued / --running.

    A change holds from the next task queued or claimed, in every API process.
    """
    from helix_api.accounts import limits
    from helix_api.errors import NotFound
    from helix_api.tasks.rules import Rules

    settings = load_settings()
    changes = {key: None if value is _DEFAULT else value
               for key, value in (("max_queued", queued), ("max_running", running)) if value is not None}
    try:
        now = limits.change(_database(settings=settings), name, Rules.from_settings(settings), **changes)
    except NotFound as exc:
        raise click.ClickException(exc.message) from None
    if changes:
        click.echo(f"limits of {name} set", err=True)
    for what, own, effective, count in (("queued", now.max_queued, now.effective_queued, now.queued),
                                        ("running", now.max_running, now.effective_running, now.running)):
        limit = f"limit {effective}" if effective is not None else "no limit"
        click.echo(f"{what:<8} {count} now; {limit} ({'own' if own is not None else 'operator default'})")


@main.group("runner-token")
def runner_token() -> None:
    """Credentials for runners."""


@runner_token.command("create")
@click.option("--name", default="runner", show_default=True, help="Shown as the runner in task rows.")
def runner_token_create(name: str) -> None:
    """Create a runner token; prints it (shown once) as the last line."""
    from helix_api.accounts.auth import create_runner_token

    database = _database()
    with database.orm_write() as session:
        token = create_runner_token(session, name)
    click.echo(f"created runner token {name!r}:", err=True)
    click.echo(token)


@main.group()
def tasks() -> None:
    """Tasks: the unit of GPU work."""


@tasks.command("list")
@click.option("--status", type=click.Choice(TASK_STATUSES), default=None)
@click.option("--limit", default=50, show_default=True)
def tasks_list(status: str | None, limit: int) -> None:
    """The newest tasks, one line each."""
    from sqlalchemy import select

    from helix_api.models import Task, TaskStatus

    database = _database()
    stmt = select(Task).order_by(Task.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(Task.status == TaskStatus(status))
    with database.orm_read() as session:
        rows = list(session.scalars(stmt))
    click.echo(f"{'id':>6} {'status':<10} {'mode':<8} {'type':<5} {'try':>3} {'runner':<24} model")
    for t in rows:
        click.echo(f"{t.id:>6} {t.status.value:<10} {t.mode.value:<8} {t.type.value:<5} "
                   f"{t.attempt:>3} {(t.runner or '-')[:24]:<24} {t.model_name}")
    if not rows:
        click.echo("(no tasks)", err=True)


@tasks.command("reap")
def tasks_reap() -> None:
    """Requeue (or kill) tasks whose lease expired now, instead of at the next poll; the files of attempts
    their replies no longer show are deleted, as the API does."""
    from helix_api.sessions.storage import LocalFileStore
    from helix_api.tasks.scheduler import Scheduler

    settings = load_settings()
    scheduler = Scheduler.from_settings(settings, _database(settings=settings), LocalFileStore(settings["FILES_DIR"]))
    click.echo(f"reaped {scheduler.reap()} task(s)")


@main.group()
def runners() -> None:
    """Runners: what each says it is, and whether it is still there."""


@runners.command("list")
@click.option("--json", "as_json", is_flag=True, help="The admin API's JSON instead of the table.")
def runners_list(as_json: bool) -> None:
    """Every runner seen: kinds, hardware, slots, adapters, version, last heard from (gone after a lease)."""
    import json

    from helix_api.ops import overview
    from helix_api.tasks.runners import gone_after

    settings = load_settings()
    rows = overview.runner_listing(_database(settings=settings), gone_after(settings))
    if as_json:
        click.echo(json.dumps({"runners": rows}, indent=2))
        return
    if not rows:
        click.echo("(no runners)", err=True)
        return
    for r in rows:
        state = "alive" if r["alive"] else "GONE"
        click.echo(f"{r['name']}  {state}, last heard from {r['seconds_since_seen']} s ago"
                   + (f", version {r['version']}" if r["version"] else ""))
        kinds = r["kinds"] or [{"mode": r["mode"], "type": r["type"], "model_name": r["model_name"]}]
        click.echo("  serves:   " + "; ".join(f"{k['mode']} {k['type']} {k['model_name']}" for k in kinds)
                   + (f" (backend {r['backend']})" if r["backend"] else ""))
        if r["pool"]:
            click.echo(f"  pool:     {r['pool']} (inference and fine-tuning together)")
        click.echo("  hardware: " + _hardware_line(r["hardware"]))
        slots = r["slots"]
        click.echo("  slots:    " + (f"{slots['busy']} busy, {slots['free']} free of {slots['total']}" if slots
                                     else "not reported"))
        adapters = r["adapters"]
        click.echo("  adapters: " + (", ".join(a[:12] for a in adapters) if adapters
                                     else "none" if adapters is not None else "not reported"))


@runners.command("reserve", context_settings={"ignore_unknown_options": True})
@click.argument("model")
@click.argument("count", metavar="N", type=_Limit("give 0 to remove the reservation", default_word=False))
def runners_reserve(model: str, count: int) -> None:
    """Keep N of the runners polling for both MODEL's inference and its fine-tuning free for fine-tuning
    (0: remove the reservation). MODEL is a full name or an alias."""
    from helix_api.catalog import Catalog
    from helix_api.tasks import reservations

    settings = load_settings()
    model_name = Catalog.from_setting(settings["MODELS"]).resolve(model)
    reserved = reservations.reserve(_database(settings=settings), model_name, count)
    if reserved is None:
        click.echo(f"no runners reserved for fine-tuning {model_name}")
        return
    click.echo(f"{reserved.runners} runner(s) reserved for fine-tuning {model_name}; "
               f"{reserved.pool_runners} live runner(s) serve both its inference and fine-tuning")
    if reserved.warning:
        click.echo(f"warning: this {reserved.warning}", err=True)


@runners.command("reservations")
def runners_reservations() -> None:
    """Every fine-tune reservation, with the live runners of its model's pool."""
    from helix_api.ops import overview

    rows = overview.reservation_listing(_database())
    if not rows:
        click.echo("(no reservations)", err=True)
    for r in rows:
        click.echo(f"{r['model_name']}  {r['runners']} reserved of {r['pool_runners']} live runner(s)"
                   + (f"  WARNING: {r['warning']}" if r["warning"] else ""))


def _gib(size: int) -> str:
    return f"{size / 1024**3:.1f} GiB"


def _hardware_line(hardware: dict[str, Any] | None) -> str:
    """A runner's hardware report on one line: its GPUs, else its CPU."""
    if not hardware:
        return "not reported"
    parts = [f"GPU {g['index']} {g['name']} {_gib(g['memory_free'])} free of {_gib(g['memory_total'])}"
             for g in hardware.get("gpus", [])]
    cpu = hardware.get("cpu")
    if cpu:
        parts.append(f"CPU {cpu['model']} x{cpu['cores']}, RAM {_gib(cpu['memory_available'])} free of "
                     f"{_gib(cpu['memory_total'])}")
    return "; ".join(parts)


user_cli.register(main)  # chat, image, finetune, sessions, usage: a user's commands, against a remote API

if __name__ == "__main__":
    sys.exit(main())
