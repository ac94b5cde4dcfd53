"""The SQL schema, in SQLAlchemy 2.0 typed models. Names are chosen for operators reading plain SQL."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# The vocabulary lives in its own SQLAlchemy-free module (the CLI reads it); it is re-exported here,
# next to the columns that store it, so `from .models import TaskStatus, OPEN_TASK_STATUSES` works.
from helix_api.vocabulary import ACTIVE_TASK_STATUSES as ACTIVE_TASK_STATUSES
from helix_api.vocabulary import FAILED_TASK_STATUSES as FAILED_TASK_STATUSES
from helix_api.vocabulary import FINAL_INTERACTION_STATES as FINAL_INTERACTION_STATES
from helix_api.vocabulary import FINAL_TASK_STATUSES as FINAL_TASK_STATUSES
from helix_api.vocabulary import OPEN_INTERACTION_STATES as OPEN_INTERACTION_STATES
from helix_api.vocabulary import OPEN_TASK_STATUSES as OPEN_TASK_STATUSES
from helix_api.vocabulary import AttemptEnd, Creator, InteractionState, Mode, SessionType, TaskStatus


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp that is always aware UTC in Python; `timestamptz` on PostgreSQL.

    SQLite has no time zones, so it stores naive UTC text, which still sorts and compares correctly.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def _enum(cls: type[enum.Enum]) -> SAEnum:
    # VARCHAR plus a CHECK constraint: readable in SQL and the same on SQLite and PostgreSQL.
    return SAEnum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e],
                  name=cls.__name__.lower(), create_constraint=True)


class Base(DeclarativeBase):
    """Base of all tables."""

    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class User(Base):
    """A person or program that owns sessions."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Per-user overrides of MAX_QUEUED_PER_USER and MAX_RUNNING_PER_USER (None: the operator's default;
    # 0: no limit).
    max_queued: Mapped[int | None]
    max_running: Mapped[int | None]
    # When a task of theirs was last claimed: fair shares serve, among users with as few tasks running,
    # the one served longest ago (round robin), so a one-slot fleet alternates between users too.
    last_claimed_at: Mapped[datetime | None]

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="user")


class ApiKey(Base):
    """A user's credential, stored as a SHA-256 hash; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(back_populates="api_keys")


class RunnerToken(Base):
    """A runner's credential, stored as a SHA-256 hash; the token itself is shown once."""

    __tablename__ = "runner_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Session(Base):
    """A chat or an image thread owned by one user."""

    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_user_id_id", "user_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200), default="")
    mode: Mapped[Mode] = mapped_column(_enum(Mode))
    type: Mapped[SessionType] = mapped_column(_enum(SessionType))
    model_name: Mapped[str] = mapped_column(String(500))
    # Last sequence number given to an event of this session: event ids are gap-free per session,
    # so a client resuming with Last-Event-ID misses nothing.
    event_seq: Mapped[int] = mapped_column(default=0)
    # Ids of the user's knowledge bases each turn retrieves from (see retrieval.py); empty: none.
    knowledge_bases: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    interactions: Mapped[list[Interaction]] = relationship(
        back_populates="session", order_by="Interaction.id", cascade="all, delete-orphan")


class Interaction(Base):
    """One turn of a session: a user message, or a model reply with its state and output."""

    __tablename__ = "interactions"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    creator: Mapped[Creator] = mapped_column(_enum(Creator))
    message: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[InteractionState] = mapped_column(_enum(InteractionState))
    output: Mapped[str] = mapped_column(Text, default="")
    progress: Mapped[dict[str, Any] | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    session: Mapped[Session] = relationship(back_populates="interactions")
    task: Mapped[Task | None] = relationship(back_populates="interaction", uselist=False)
    # Written by plain SQL only (transitions.complete, records.create_from_messages): read here, never set.
    tool_calls: Mapped[list[ToolCall]] = relationship(order_by="ToolCall.position", viewonly=True)


class Task(Base):
    """The unit of GPU work behind one reply: queued, leased to one runner at a time, finished once."""

    __tablename__ = "tasks"
    __table_args__ = (
        # What runners poll by: the queue of one (mode, type, model), in claim order.
        Index("ix_tasks_claim", "status", "mode", "type", "model_name", "priority", "id"),
        Index("ix_tasks_lease", "status", "lease_expires_at"),
        # Fair shares and per-user limits count a user's tasks by status; a reservation counts a
        # runner's active tasks.
        Index("ix_tasks_user_status", "user_id", "status"),
        Index("ix_tasks_runner_status", "runner", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    interaction_id: Mapped[int] = mapped_column(ForeignKey("interactions.id", ondelete="CASCADE"),
                                                unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    mode: Mapped[Mode] = mapped_column(_enum(Mode))
    type: Mapped[SessionType] = mapped_column(_enum(SessionType))
    model_name: Mapped[str] = mapped_column(String(500))
    # Lower goes first: 0 continues a running chat, 1 starts a new session.
    priority: Mapped[int] = mapped_column(default=1)
    status: Mapped[TaskStatus] = mapped_column(_enum(TaskStatus), default=TaskStatus.QUEUED)
    input: Mapped[dict[str, Any]] = mapped_column(default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    # Claims so far; doubles as the fencing token of the current lease.
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    # The key (checksum) of the LoRA adapter the task runs with, if any: warm routing matches it
    # against the adapters a runner holds.
    adapter: Mapped[str | None] = mapped_column(String(128))
    # Until then only a runner holding `adapter` may take the task (a live one with a free slot held it
    # when the task was queued); None: any runner of the kind may.
    warm_until: Mapped[datetime | None]
    runner: Mapped[str | None] = mapped_column(String(200))
    runner_token_id: Mapped[int | None] = mapped_column(ForeignKey("runner_tokens.id", ondelete="SET NULL"))
    # Highest runner event seq stored for the current attempt (retried posts are stored once).
    last_event_seq: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]

    interaction: Mapped[Interaction] = relationship(back_populates="task")


class ToolCall(Base):
    """A function call an assistant reply made, with the result the caller sent back (if it did)."""

    __tablename__ = "tool_calls"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    # The assistant reply that made the call.
    interaction_id: Mapped[int] = mapped_column(ForeignKey("interactions.id", ondelete="CASCADE"), index=True)
    position: Mapped[int]  # the call's place in its reply, from 0
    call_id: Mapped[str] = mapped_column(String(64))  # OpenAI's `id`: call_<task id>_<position> from a runner
    name: Mapped[str] = mapped_column(String(200))
    arguments: Mapped[str] = mapped_column(Text)  # JSON text, as the model wrote it
    # The `tool` message's content that answered the call; None until (unless) a later request sends it.
    result: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskEvent(Base):
    """A token, progress report, log line or state change, in per-session order."""

    __tablename__ = "task_events"
    __table_args__ = (UniqueConstraint("session_id", "seq", name="uq_task_events_session_seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    seq: Mapped[int]
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    interaction_id: Mapped[int] = mapped_column(ForeignKey("interactions.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(default=0)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class File(Base):
    """A file that belongs to a session: an upload, a generated output or an adapter."""

    __tablename__ = "files"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    interaction_id: Mapped[int | None] = mapped_column(ForeignKey("interactions.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(1000))
    size: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(100))
    # The task attempt that uploaded it (runner files only): a failed task keeps its last attempt's.
    attempt: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Runner(Base):
    """A runner the API has heard from: what it serves and when it last polled or reported."""

    __tablename__ = "runners"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The runner's name (X-Helix-Runner, else its token's name): one row per name.
    name: Mapped[str] = mapped_column(String(200), unique=True)
    runner_token_id: Mapped[int | None] = mapped_column(ForeignKey("runner_tokens.id", ondelete="SET NULL"))
    mode: Mapped[Mode] = mapped_column(_enum(Mode))
    type: Mapped[SessionType] = mapped_column(_enum(SessionType))
    model_name: Mapped[str] = mapped_column(String(500))
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # What the runner last reported of itself (at start and in heartbeats); all None for a runner that
    # never reports (the seed's protocol). See schemas/worker.RunnerReport for the shapes.
    hardware: Mapped[dict[str, Any] | None]  # {"gpus": [{index, name, memory_total, memory_free}], "cpu": {...}}
    backend: Mapped[str | None] = mapped_column(String(200))
    kinds: Mapped[list[Any] | None]  # [{mode, type, model_name}]
    slots_total: Mapped[int | None]
    slots_busy: Mapped[int | None]
    adapters: Mapped[list[Any] | None]  # checksums of the adapters in memory
    version: Mapped[str | None] = mapped_column(String(100))
    reported_at: Mapped[datetime | None]
    # The model whose inference and fine-tuning this runner polls for together (None: it does not):
    # such runners form the pool a fine-tune reservation keeps capacity in.
    pool: Mapped[str | None] = mapped_column(String(500))


class Reservation(Base):
    """Runners kept for fine-tuning a model: of the runners polling for both its inference and its
    fine-tuning, `runners` take inference work only while more than that many of them are idle."""

    __tablename__ = "reservations"

    model_name: Mapped[str] = mapped_column(String(500), primary_key=True)
    runners: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskUsage(Base):
    """What one attempt at a task used, recorded as it ended: the user's bill and the operator's cost.

    A row per attempt end: a completed attempt carries the runner's token counts and the images it
    made; an attempt that failed, was lost or handed back carries only its runner seconds, which no
    user is billed for (`billed` false).
    """

    __tablename__ = "task_usage"
    __table_args__ = (Index("ix_task_usage_user_finished", "user_id", "finished_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # Usage outlives what it was for: a deleted session leaves its bill.
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"), index=True)
    session_id: Mapped[int | None] = mapped_column(ForeignKey("sessions.id", ondelete="SET NULL"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    mode: Mapped[Mode] = mapped_column(_enum(Mode))
    type: Mapped[SessionType] = mapped_column(_enum(SessionType))
    model_name: Mapped[str] = mapped_column(String(500))
    attempt: Mapped[int] = mapped_column(default=0)
    outcome: Mapped[AttemptEnd] = mapped_column(_enum(AttemptEnd))
    billed: Mapped[bool] = mapped_column(default=False)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    images: Mapped[int] = mapped_column(default=0)
    # From the claim to the attempt's end (its lease's expiry, for a runner that vanished).
    runner_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

class KnowledgeBase(Base):
    """A user's collection of documents that chats may draw on."""

    __tablename__ = "knowledge_bases"
    __table_args__ = (Index("ix_knowledge_bases_user_id_id", "user_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class KnowledgeDocument(Base):
    """A text or Markdown document in a knowledge base, split into chunks."""

    __tablename__ = "knowledge_documents"

    id: Mapped[int] = mapped_column(primary_key=True)
    knowledge_base_id: Mapped[int] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"),
                                                   index=True)
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    chunks: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class KnowledgeChunk(Base):
    """A passage of a document: what retrieval ranks and hands to the model.

    Full-text search over `text` is the database's own and lives outside these models (migration
    0006): an FTS5 table `knowledge_fts` kept by triggers on SQLite, a stored generated column
    `search` = `to_tsvector('english', text)` with a GIN index on PostgreSQL.
    """

    __tablename__ = "knowledge_chunks"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Denormalised from the document, so a search filters by knowledge base without a join.
    knowledge_base_id: Mapped[int] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"),
                                                   index=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("knowledge_documents.id", ondelete="CASCADE"),
                                             index=True)
    ordinal: Mapped[int]  # the chunk's place in its document, from 0
    text: Mapped[str] = mapped_column(Text)
