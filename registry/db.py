"""Engines and the one place that commits: :func:`session_scope`.

Services flush but never commit. The composition root (CLI command, API dependency, worker task)
opens a scope; the scope commits when the block succeeds and rolls back when it raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

POOL_SIZE = 10
POOL_CAPACITY = 20
"""Connections a server engine keeps open, and the most it opens under load (the API's concurrency bound)."""


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets foreign keys and a folder to live in."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        in_memory = database in (None, "", ":memory:") or "mode=memory" in url
        if not in_memory:
            Path(str(database)).parent.mkdir(parents=True, exist_ok=True)
        # A file database gets the same pool bounds as a server one (the API's concurrency gate relies on them);
        # an in-memory one keeps SQLAlchemy's single-connection pool.
        pool: dict[str, Any] = {"pool_size": POOL_SIZE, "max_overflow": POOL_CAPACITY - POOL_SIZE}
        engine = create_engine(url, connect_args={"timeout": 30}, **({} if in_memory else pool))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, decide when transactions begin, so that savepoints and
            # transactional DDL behave as on PostgreSQL.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_CAPACITY - POOL_SIZE)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """The unit of work: commit on success, roll back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
