"""The database: engine set-up for SQLite and PostgreSQL, and read/write unit-of-work helpers."""

from __future__ import annotations

import logging
import threading
import time
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import Connection, Engine, bindparam, create_engine, event, insert, text
from sqlalchemy.orm import Session, sessionmaker

from helix_api.tasks.notifier import CHANNEL, Notifier, notify_payload, take_published

logger = logging.getLogger(__name__)

_NOTIFY = text("SELECT pg_notify(:channel, :payload)")
_PING = text("SELECT 1")


def normalize_url(url: str) -> str:
    """Use psycopg 3 for any PostgreSQL URL, so `postgresql://...` works as given."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the settings each dialect needs for a many-writer queue."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        _configure_sqlite(engine)
        return engine
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 5)
        kwargs.setdefault("max_overflow", 15)
    # No pool_pre_ping: it costs a round trip per checkout on every request. A connection that died
    # with a database restart fails one request (a 5xx, which runners retry) and is then replaced.
    return create_engine(url, pool_recycle=1800, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy, not the driver, issue BEGIN, so writers can take the lock up front.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # BEGIN IMMEDIATE for writes: a deferred transaction that reads and then writes can fail with
        # SQLITE_BUSY without waiting, where IMMEDIATE waits its turn for the write lock.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """Binds an engine to the app and hands out ORM sessions for reads and for writes."""

    def __init__(self, url: str | None = None, notifier: Notifier | None = None) -> None:
        self.engine: Engine | None = None
        self.notifier = notifier or Notifier()
        # On PostgreSQL with a listener running, wake-ups travel by NOTIFY to every process,
        # this one included; otherwise they are delivered in-process after commit.
        self.relayed = False
        # When the database was found out of reach (None: it answers), so an outage is logged once.
        self._down_since: float | None = None
        self._outage_lock = threading.Lock()
        if url:
            self.open(url)

    def open(self, url: str) -> None:
        """Create the engine and session factories for `url`."""
        self.engine = make_engine(url)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        writer_bind = self.engine
        if self.engine.dialect.name == "sqlite":
            writer_bind = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._writer = sessionmaker(writer_bind, expire_on_commit=False)
        self._write_engine = writer_bind
        event.listen(self.engine, "connect", self._connected)

    def went_down(self, err: Exception) -> None:
        """Note that a request found the database out of reach; logged once per outage, not per request."""
        with self._outage_lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        first_line = str(getattr(err, "orig", None) or err).strip().splitlines()[0][:300]
        logger.error("database unreachable, answering 503 until it is back: %s", first_line)

    @property
    def reachable(self) -> bool:
        """False from a request finding the database out of reach until a new connection to it succeeds."""
        return self._down_since is None

    def _connected(self, _dbapi_conn: Any, _record: Any) -> None:
        # A new connection is the first sign of a database that is back: after an outage the pool
        # has dropped the old ones, so every request opens a new one until one succeeds.
        if self._down_since is None:
            return
        with self._outage_lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            logger.warning("database reachable again after %.1f s", time.monotonic() - since)

    def init_app(self, app: Flask) -> None:
        """Connect to the app's DATABASE_URL; the app reaches the database through `services()`."""
        self.open(app.config["DATABASE_URL"])

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        assert self.engine is not None
        return self.engine.dialect.name

    def ping(self) -> None:
        """Raise unless the database answers a query."""
        with self.connect() as conn:
            conn.execute(_PING)

    @contextmanager
    def orm_read(self) -> Iterator[Session]:
        """A session for reading; nothing it changes is committed."""
        with self._reader() as session:
            yield session

    @contextmanager
    def orm_write(self) -> Iterator[Session]:
        """A session whose changes are committed at the end, or rolled back on error.

        Topics published in it (see notifier.publish) wake their waiters once it has committed.
        """
        with self._writer() as session:
            with session.begin():
                yield session
                topics = self._send_topics(session)
            self._wake(topics)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A plain connection for reading, cheaper than a session on hot paths."""
        assert self.engine is not None
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """Like `orm_write()`, on a plain connection: for the hot paths, which use Core statements."""
        with self._write_engine.connect() as conn:
            take_published(conn)  # the info dict outlives a checkout: start clean
            try:
                with conn.begin():
                    yield conn
                    topics = self._send_topics(conn)
            finally:
                take_published(conn)
            self._wake(topics)

    def _send_topics(self, db: Session | Connection) -> dict[str, int]:
        topics = take_published(db)
        if topics and self.dialect == "postgresql":
            # NOTIFY is transactional: delivered on commit, dropped on rollback.
            db.execute(_NOTIFY, {"channel": CHANNEL, "payload": notify_payload(topics)})
        return topics

    def _wake(self, topics: dict[str, int]) -> None:
        if topics and not self.relayed:
            self.notifier.notify_many(topics)

    def listen(self) -> None:
        """On PostgreSQL, relay NOTIFY wake-ups from every API process to this one's waiters."""
        if self.dialect == "postgresql":
            assert self.engine is not None
            url = self.engine.url.set(drivername="postgresql")
            self.notifier.listen(url.render_as_string(hide_password=False))
            self.relayed = True

    def dispose(self) -> None:
        """Close all pooled connections and stop listening."""
        self.notifier.stop()
        if self.engine is not None:
            self.engine.dispose()


class Prepared:
    """A Core statement compiled once per dialect and run on the DBAPI cursor of a connection.

    On the dispatch hot paths SQLAlchemy's execution machinery costs several times the statement
    itself (~70 us against ~16 us for a claim on SQLite, measured). This keeps what matters of it:
    the statement's own bind and result types (enums, UTC times, JSON), `before_cursor_execute`
    listeners, and DBAPI errors wrapped (and dead connections invalidated) as SQLAlchemy does, so
    an outage is still a 503. It runs in the caller's transaction.
    """

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        self._by_dialect: dict[str, tuple[Any, ...]] = {}

    def _prepare(self, dialect: Any) -> tuple[Any, ...]:
        compiled = self.statement.compile(dialect=dialect)
        if "POSTCOMPILE" in compiled.string:  # an IN of a list: its parameters are made per execution
            raise ValueError("a Prepared statement cannot hold an expanding IN; spell it with OR")
        processors = dict(compiled._bind_processors)
        constants = {}
        for name, value in compiled.construct_params(_check=False).items():
            if value is not None and name in processors:
                value = processors[name](value)
            constants[name] = value
        order = tuple(compiled.positiontup) if compiled.positional else None
        results = tuple(column[3]._cached_result_processor(dialect, None) for column in compiled._result_columns)
        # Rows read by name (`row.id`) as well as by position, as SQLAlchemy's own rows are.
        row_type = namedtuple("Row", [column[0] for column in compiled._result_columns], rename=True)
        prepared = (compiled.string, order, constants, processors, results, row_type)
        self._by_dialect[dialect.name] = prepared
        return prepared

    def run(self, conn: Connection | Session, params: dict[str, Any]) -> tuple[list[Any], int]:
        """Execute with `params` (names as bound); the processed rows returned, and the rowcount.

        On an ORM session (the slower paths share some statements) it runs the ordinary way.
        """
        if not isinstance(conn, Connection):
            result = conn.execute(self.statement, params)
            return (list(result) if result.returns_rows else []), result.rowcount
        sql, order, constants, processors, results, row_type = (self._by_dialect.get(conn.dialect.name)
                                                                or self._prepare(conn.dialect))
        values = dict(constants)
        for name, value in params.items():
            if name in values:
                processor = processors.get(name)
                values[name] = processor(value) if processor is not None and value is not None else value
        args: Any = tuple(values[name] for name in order) if order is not None else values
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            if conn._has_events or conn.engine._has_events:
                conn.dispatch.before_cursor_execute(conn, cursor, sql, args, None, False)
            cursor.execute(sql, args)
            rows = cursor.fetchall() if cursor.description else []
            count = cursor.rowcount
        except Exception as err:
            conn._handle_dbapi_exception(err, sql, args, cursor, None)  # raises, wrapped
            raise
        finally:
            cursor.close()
        if rows:
            rows = [row_type._make(p(v) if p is not None else v for p, v in zip(results, row, strict=True))
                    for row in rows]
        return rows, count

    def rows(self, conn: Connection | Session, params: dict[str, Any]) -> list[Any]:
        """The rows the statement returns."""
        return self.run(conn, params)[0]

    def one_or_none(self, conn: Connection | Session, params: dict[str, Any]) -> Any | None:
        """The one row it returns, or None."""
        rows = self.run(conn, params)[0]
        return rows[0] if rows else None

    def one(self, conn: Connection | Session, params: dict[str, Any]) -> Any:
        """The one row it returns."""
        rows = self.run(conn, params)[0]
        if len(rows) != 1:
            raise ValueError(f"expected one row, got {len(rows)}")
        return rows[0]


def insert_row(table: Any) -> Any:
    """An INSERT of one row of `table` returning every column, each value bound by its column's name."""
    return (insert(table).values({c.name: bindparam(c.name) for c in table.c if not c.primary_key})
            .returning(*table.c))
