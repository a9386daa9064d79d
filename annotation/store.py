"""The annotation store: ORM models for the data model in DESIGN.md, engines and sessions.

SQLite (WAL, foreign keys, busy timeout) is the embedded default; PostgreSQL is the multi-annotator
deployment. The same models and queries serve both. The schema is created and upgraded only by
the Alembic migrations in `annotation/migrations` (`init_db` runs them); `Base.metadata` exists so
that Alembic can compare it with the database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    false,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from annotation.errors import StoreError

ROLES = ("annotator", "researcher", "admin")
CHOICES = ("a", "b", "tie", "both_bad")
MIN_RANKED_RESPONSES, MAX_RANKED_RESPONSES = 3, 6
"""A ranking item holds this many responses; two responses are a pair (response_a, response_b)."""
STRENGTHS = {1: "slight", 2: "clear", 3: "strong"}
FLAG_KINDS = ("skip", "broken", "unsafe")
JOB_KINDS = ("train_rm", "eval_rm", "sft", "ppo", "dpo", "grpo", "rloo", "eval_policy", "generate", "export", "score_queue")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
MODEL_KINDS = ("reward", "policy")

SQLITE_BUSY_TIMEOUT_MS = 30_000


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    password_hash: Mapped[str | None] = mapped_column(String(256))  # None: cannot log in (import sources)
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="annotator")
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    guidelines: Mapped[str] = mapped_column(Text, nullable=False, default="")
    overlap: Mapped[int] = mapped_column(Integer, nullable=False, default=3)
    choices: Mapped[list] = mapped_column(JSON, nullable=False, default=lambda: list(CHOICES))
    criteria: Mapped[list] = mapped_column(JSON, nullable=False, default=list)
    gold_rate: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    lease_seconds: Mapped[int] = mapped_column(Integer, nullable=False, default=600)
    # Migration 0005: which item goes next (annotation.selection), and the model's suggestions.
    selection: Mapped[str] = mapped_column(String(16), nullable=False, default="random", server_default="random")
    random_share: Mapped[float] = mapped_column(Float, nullable=False, default=0.2, server_default="0.2")
    suggestions: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class Item(Base):
    """A prompt with two responses to compare, or (a ranking item) with 3 to 6 responses to rank.

    A ranking item keeps its responses in `responses` and has empty response_a/response_b and no
    sources there (those columns are NOT NULL and predate rankings); `responses IS NULL` is a pair.
    """

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("project_id", "content_hash", name="uq_items_project_hash"),
        # annotation.assign's queue: "closest to completion, then queue_key, then lowest id" as an
        # index range scan (queue_key is 0 unless a reward model ordered the project: 0005).
        Index("ix_items_queue", "project_id", "annotation_count", "queue_key", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), nullable=False, index=True)
    external_id: Mapped[str | None] = mapped_column(String(200))
    # A string, or a list of {"role", "content"} chat messages.
    prompt: Mapped[Any] = mapped_column(JSON, nullable=False)
    response_a: Mapped[str] = mapped_column(Text, nullable=False)
    response_b: Mapped[str] = mapped_column(Text, nullable=False)
    source_a: Mapped[str | None] = mapped_column(String(200))
    source_b: Mapped[str | None] = mapped_column(String(200))
    # Ranking items only (migration 0004): [{"text", "source"}, ...], 3 to 6 of them, in stored order.
    responses: Mapped[list | None] = mapped_column(JSON(none_as_null=True))
    meta: Mapped[dict] = mapped_column("metadata", JSON, nullable=False, default=dict)
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    gold_choice: Mapped[str | None] = mapped_column(String(16))
    # Number of rows in `annotations` for this item, kept by database triggers (migration 0002) so
    # that every writer keeps it right; read it, never write it.
    annotation_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # The item's place in its completion level of the queue, written by annotation.selection: 0
    # until a reward model scores the project, then negative, the least sure item most negative.
    queue_key: Mapped[float] = mapped_column(Float, nullable=False, default=0.0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class ItemScore(Base):
    """What the scoring job (reward.usecases.score_queue) found for one item (migration 0005)."""

    __tablename__ = "item_scores"
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    p_a: Mapped[float | None] = mapped_column(Float)
    """The model's P(response A preferred) for a pair; None for a ranking item."""
    top: Mapped[int | None] = mapped_column(Integer)
    """For a ranking item, the stored index of the response the model ranks first."""
    uncertainty: Mapped[float] = mapped_column(Float, nullable=False)
    """Larger is less sure: 1 - confidence (margin) or the ensemble's spread (disagreement)."""
    measure: Mapped[str] = mapped_column(String(16), nullable=False)
    calibration: Mapped[bool] = mapped_column(Boolean, nullable=False)
    """Drawn at random (the queue's calibration share) rather than placed by its uncertainty."""
    queue_key: Mapped[float | None] = mapped_column(Float)
    """The place it was given (copied into items.queue_key); None for a gold item, which has none."""
    scored_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class Prompt(Base):
    """A prompt alone, for generation and PPO (imported from a prompts-only file)."""

    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("project_id", "content_hash", name="uq_prompts_project_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), nullable=False, index=True)
    external_id: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[Any] = mapped_column(JSON, nullable=False)
    meta: Mapped[dict] = mapped_column("metadata", JSON, nullable=False, default=dict)
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class Annotation(Base):
    """One person's judgement of one item. `choice` is always in A/B terms, whatever order was shown.

    For a ranking item `choice` is NULL and `ranking` holds the rank of each response in stored
    order (1 = best; tied responses share a rank and the next rank skips, e.g. [1, 1, 3, 4]);
    `shown_order` is the stored indices in the order the annotator saw them (as shown_swapped is
    for a pair).
    """

    __tablename__ = "annotations"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id", name="uq_annotations_item_annotator"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), nullable=False, index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    choice: Mapped[str | None] = mapped_column(String(16))  # NULL for a ranking (migration 0004)
    strength: Mapped[int | None] = mapped_column(Integer)
    criteria: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    rationale: Mapped[str | None] = mapped_column(Text)
    shown_swapped: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    ranking: Mapped[list | None] = mapped_column(JSON(none_as_null=True))
    shown_order: Mapped[list | None] = mapped_column(JSON(none_as_null=True))
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    # The reward model's suggestion shown with the item (0005): "a"/"b", or a ranking's stored index
    # of the response the model put first; NULL when no suggestion was shown.
    suggestion: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class Assignment(Base):
    """An item handed to an annotator and not yet answered; it returns to the pool after leased_until."""

    __tablename__ = "assignments"
    __table_args__ = (Index("ix_assignments_annotator_leased", "annotator_id", "leased_until"),)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    leased_until: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, index=True)
    shown_swapped: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    shown_order: Mapped[list | None] = mapped_column(JSON(none_as_null=True))  # ranking items (0004)
    suggestion: Mapped[str | None] = mapped_column(String(16))  # the model's suggestion shown (0005)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class ItemFlag(Base):
    """An annotator skipped an item or flagged it as broken or unsafe."""

    __tablename__ = "item_flags"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id", "kind", name="uq_item_flags"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), nullable=False, index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    params: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    message: Mapped[str] = mapped_column(Text, nullable=False, default="")
    log_path: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class RegisteredModel(Base):
    """A trained reward model or policy: where it lives, where it came from, how good it is."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    base_model: Mapped[str | None] = mapped_column(Text)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="SET NULL"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    data_hash: Mapped[str | None] = mapped_column(String(64))
    data_rows: Mapped[int | None] = mapped_column(Integer)
    params: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


# --------------------------------------------------------------------------- engines and sessions


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # transactions are begun by _sqlite_begin
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _switch_to_wal(cur)
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def sqlite_busy(message: str) -> bool:
    """Whether a database error's message is SQLite's "another connection holds the lock"."""
    message = message.lower()
    return "database is locked" in message or "database is busy" in message


def _switch_to_wal(cur) -> None:
    """Put the database file in WAL mode (once per file: the mode is stored in it). Processes that
    open a new file at the same moment (the ranks of `accelerate launch`, say) can each hold a
    shared lock while asking for the exclusive one the switch needs; SQLite then answers
    "database is locked" at once rather than wait on busy_timeout (it would be a deadlock), so the
    switch is retried until busy_timeout has passed."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not sqlite_busy(str(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_begin(conn) -> None:
    # pysqlite's own transaction handling starts transactions lazily (DEFERRED), so two writers can
    # both read and then collide on upgrade, which SQLite answers with SQLITE_BUSY and no wait.
    # Taking the write lock at BEGIN makes concurrent writers queue on busy_timeout instead.
    # Connections marked read_only (see `reading`) begin DEFERRED: in WAL mode a reader never
    # waits for writers, so a long export or a dashboard does not hold annotators' submits back.
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("read_only") else "BEGIN IMMEDIATE")


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url if isinstance(engine_or_url, str) else str(engine_or_url.url)
    return url.startswith("sqlite")


PG_CONNECT_TIMEOUT_S = 10
"""How long a PostgreSQL connection attempt waits (unless the URL sets connect_timeout): an
unreachable server is an error in seconds, not a hang."""


def masked_url(url: str) -> str | None:
    """`url` with any password shown as ***, or None when it is too malformed to mask with certainty
    (it is then better not shown at all: it may hold a password)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (any parse failure: ArgumentError, ValueError for a bad port, ...)
        pass
    if "://" not in url:
        return None
    masked = re.sub(r"(://[^/@:]*:)[^@]*@", r"\1***@", url, count=1)
    return None if "@" in masked and "***@" not in masked else masked


def make_engine(url: str, **kwargs) -> Engine:
    """An engine for `url`, with the SQLite settings the store relies on when it is SQLite. A URL that
    is malformed, names an unknown database or a driver that is not installed raises StoreError."""
    try:
        if is_sqlite(url):
            path = url.split("///", 1)[-1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs
            )
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        parsed = make_url(url)
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **kwargs.get("connect_args", {})}
        return create_engine(url, pool_pre_ping=True, **kwargs)
    except NoSuchModuleError:
        scheme = url.split("://", 1)[0]
        raise StoreError(masked_url(url), f"unknown kind of database '{scheme}'; expected sqlite:///PATH or "
                                          "postgresql+psycopg://USER:PASSWORD@HOST:PORT/NAME") from None
    except ArgumentError:
        raise StoreError(None, "not a database URL; expected sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/NAME") from None
    except ValueError as exc:  # e.g. a port that is not a number
        raise StoreError(masked_url(url), f"malformed URL ({exc})") from None
    except ImportError as exc:
        raise StoreError(masked_url(url), f"its database driver is not installed (no module named '{exc.name}')") from None
    except OSError as exc:
        raise StoreError(masked_url(url), f"cannot create the directory for the database file: {exc.strerror}") from None


def driver_message(url: str, exc: DBAPIError) -> str:
    """The first line of the database driver's message for `exc`, with the password of `url` masked."""
    lines = (str(exc.orig) if exc.orig is not None else str(exc)).strip().splitlines() or ["no reason given"]
    password = _password(url)
    return lines[0].replace(password, "***") if password else lines[0]


def _password(url: str) -> str | None:
    try:
        return make_url(url).password
    except Exception:  # noqa: BLE001
        return None


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """A session whose work is committed together at the end, or rolled back whole on any error."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def read_connection(engine: Engine) -> Connection:
    """A connection for reading only: one consistent snapshot, and on SQLite no write lock taken."""
    return engine.connect().execution_options(read_only=True)


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Session]:
    """A session for reading only (see `read_connection`); it never commits."""
    with read_connection(engine) as conn, Session(bind=conn, expire_on_commit=False) as session:
        yield session


def migrations_dir() -> Path:
    return Path(__file__).with_name("migrations")


def init_db(url: str) -> Engine:
    """Create or upgrade the schema at `url` to the newest migration and return an engine for it."""
    from alembic import command
    from alembic.config import Config

    engine = make_engine(url)
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        engine.dispose()
        raise StoreError(masked_url(url), f"cannot connect: {driver_message(url, exc)}") from None
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if _at_head(engine, cfg):
        return engine  # nothing to upgrade: checked on a read-only connection, so no write lock taken
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return engine


def _at_head(engine: Engine, cfg) -> bool:
    """Whether the schema is at the newest migration already."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(cfg).get_heads())
    with read_connection(engine) as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads
