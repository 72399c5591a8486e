"""Shared fixtures: real databases (PostgreSQL and SQLite, migrated with Alembic), an artifact store,
and synthetic PEFT adapters.

Every DB test runs twice, once per backend (``db_engine`` is parametrised), inside one transaction that
is rolled back afterwards. Code under test may ``commit``: sessions join the outer transaction through
savepoints, so commits stay invisible to other tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bench.synthetic import TINY, write_adapter
from registry.artifacts import ArtifactStore
from registry.db import make_engine
from registry.migrate import upgrade_to_head

PG_SERVER = os.environ.get("GRAFT_TEST_PG_SERVER", "postgresql+psycopg://postgres@127.0.0.1:5432")
PG_ADMIN_DSN = os.environ.get("GRAFT_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=test")


def create_pg_database(prefix: str) -> str:
    """Create an empty database on the local server; return its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[-1]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_pg_database("graft_test")
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="session", params=["postgresql", "sqlite"])
def db_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A migrated database: the real PostgreSQL server, then the embedded SQLite file."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'graft.db'}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(db_engine: Engine) -> Iterator[sessionmaker[Session]]:
    """A session factory whose sessions all live inside one rolled-back transaction."""
    connection = db_engine.connect()
    outer = connection.begin()
    yield sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    outer.rollback()
    connection.close()


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session:
        yield session


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def make_adapter(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a synthetic PEFT folder over the tiny Llama shape: ``make_adapter("code", seed=1, rank=8)``."""

    def make(name: str, **kwargs: object) -> Path:
        kwargs.setdefault("base_model", TINY.base_model)
        modules = kwargs.pop("modules", None) or TINY.modules()
        return write_adapter(tmp_path / "adapters" / f"{name}-{uuid.uuid4().hex[:6]}", modules, **kwargs)  # type: ignore[arg-type]

    return make
