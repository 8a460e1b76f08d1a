"""Opening a store: URL handling, SQLite settings, sessions, and the locks that make concurrent writers safe."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from align.errors import AlignError, DataError

SQLITE_BUSY_TIMEOUT_MS = 30_000

# Keys of PostgreSQL transaction-level advisory locks. SQLite needs none: every write transaction there starts
# with BEGIN IMMEDIATE, which already serialises writers.
LOCK_KEYS = {"schema": 0x616C_6701, "lease": 0x616C_6702}


class Store:
    """An open preference store: the engine plus session factories. Close it, or use it as a context manager."""

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.url = url  # password already masked: safe to print
        self.dialect = engine.dialect.name
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        # On SQLite a deferred transaction that reads and then writes can fail at once with "database is locked"
        # when another writer got in between; taking the write lock up front makes writers queue on busy_timeout.
        writer = engine.execution_options(begin_immediate=True) if self.dialect == "sqlite" else engine
        self._write_sessions = sessionmaker(writer, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries (one consistent snapshot on SQLite)."""
        with self.sessions() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in one transaction: commits when the block ends, rolls back on an exception."""
        with self._write_sessions.begin() as session:
            yield session

    def lock(self, session: Session, name: str) -> None:
        """Serialise this transaction with every other one taking the same named lock, until it ends."""
        if self.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEYS[name]})

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"


def connect(url: str | os.PathLike[str]) -> Store:
    """Open (creating or migrating as needed) the store at `url`: a SQLite path/URL or a postgresql:// URL."""
    from align.store.migrations import ensure_schema  # migrations imports this module

    parsed = parse_url(url)
    masked = parsed.render_as_string(hide_password=True)
    engine = None
    try:
        engine = build_engine(parsed)
        store = Store(engine, masked)
        ensure_schema(store)
        return store
    except AlignError:
        if engine is not None:
            engine.dispose()
        raise
    except (SQLAlchemyError, OSError) as error:
        if engine is not None:
            engine.dispose()
        raise AlignError(f"cannot open store {masked}: {first_line(error)}") from error


open_store = connect


def parse_url(url: str | os.PathLike[str]) -> URL:
    """Turn a path or URL into a SQLAlchemy URL for a supported backend, normalising PostgreSQL to psycopg 3."""
    raw = os.fspath(url).strip()
    if not raw:
        raise AlignError("empty store URL; give a path like runs/store.db or a postgresql:// URL")
    if "://" not in raw:
        # A bare path means a SQLite file, the default backend.
        return URL.create("sqlite", database=str(Path(raw).expanduser()))
    try:
        parsed = make_url(raw)
    except ArgumentError as error:
        raise AlignError(f"cannot parse store URL {mask_password(raw)}") from error
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        shown = parsed.render_as_string(hide_password=True)
        raise AlignError(f"unsupported store URL {shown}: use sqlite:///path.db or postgresql://user:pass@host/db")
    return parsed


def build_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = sqlite_engine(url)
    else:
        engine = create_engine(url)
        ping_idle_connections(engine)
    event.listen(engine, "before_execute", _refuse_nul)
    return engine


PING_AFTER_IDLE_SECONDS = 10.0


def ping_idle_connections(engine: Engine) -> None:
    """A long-lived labeling app must survive the server closing idle connections (or restarting). SQLAlchemy's
    pool_pre_ping pings on every checkout, a round trip per transaction; here only a connection idle for
    PING_AFTER_IDLE_SECONDS is pinged before use (a dead one is replaced, as pre_ping would), and a busy one is
    used as it is."""

    def checked_in(_dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    def checked_out(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:  # the pool replaces the connection and tries again
            raise DisconnectionError(f"an idle connection was closed: {first_line(error)}") from error

    event.listen(engine, "checkin", checked_in)
    event.listen(engine, "checkout", checked_out)


def _refuse_nul(_conn, clause, multiparams, params, _options) -> None:
    """PostgreSQL cannot store a NUL character in text (psycopg raises a driver error) and SQLite stores it
    silently; both refuse it here, before the statement runs, naming the table and the column."""
    rows = [params] if params else []
    for item in multiparams or ():
        rows += item if isinstance(item, (list, tuple)) else [item]
    for row in rows:
        for column, value in (row.items() if isinstance(row, dict) else ()):
            if holds_nul(value):
                table = getattr(getattr(clause, "table", None), "name", "the store")
                raise DataError(f"{table}.{column}: a NUL character (\\x00) cannot be stored; remove it from the input")


def holds_nul(value: Any) -> bool:
    """Whether a string, or any string inside nested dicts and lists, holds a NUL character."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(k) or holds_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(holds_nul(v) for v in value)
    return False


def sqlite_engine(url: URL) -> Engine:
    if url.database in (None, "", ":memory:"):
        # One shared connection, or every session would see its own empty in-memory database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    # Take transaction control away from the sqlite3 module (it would skip BEGIN before SELECT and DDL);
    # _sqlite_on_begin emits BEGIN itself, so migrations and read-then-write blocks are truly atomic.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")  # before WAL: switching mode may wait
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
    # In WAL mode NORMAL syncs at checkpoints, not at every commit: a commit survives the process being killed
    # (kill -9 loses nothing), only a power cut or OS crash can take back the last commits. FULL made every
    # vote wait for two fsyncs (the vote and the next lease), which capped SQLite at about 40 votes/s.
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def _sqlite_on_begin(connection) -> None:
    immediate = connection.get_execution_options().get("begin_immediate", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def mask_password(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def first_line(error: BaseException) -> str:
    cause = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[0] if lines else type(cause).__name__


# ---- writes that many processes can make at once ----------------------------------------------------------------

CHUNK = 500  # ids per IN (...) list: well under SQLite's bound-parameter limit


def insert_ignoring_conflicts(session: Session, model: type, rows: list[dict[str, Any]], key: Sequence[str]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: concurrent writers of the same rows never fail or duplicate.

    Rows are deduplicated and sorted on their unique `key` first: PostgreSQL refuses to touch one row twice in a
    statement, and two writers inserting overlapping rows in different orders would deadlock on each other.
    """
    unique = {tuple(row[k] for k in key): row for row in reversed(rows)}  # reversed: the first repeat wins
    if not unique:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(model.__table__).on_conflict_do_nothing(), [unique[k] for k in sorted(unique)])


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
