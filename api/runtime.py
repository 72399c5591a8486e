"""The composition root for processes that use the registry: settings → engine → sessions → store."""

from __future__ import annotations

from dataclasses import dataclass

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from registry.artifacts import ArtifactStore
from registry.db import make_engine, make_session_factory
from registry.errors import InvalidConfig
from registry.migrate import alembic_config, upgrade_to_head
from registry.settings import Settings, load_settings


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore


def schema_is_current(engine: Engine) -> bool:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision() == head


def build_runtime(settings: Settings | None = None, *, migrate: bool | None = None) -> Runtime:
    """Wire everything from the settings.

    The embedded SQLite database is migrated automatically; a configured server database must be
    migrated explicitly (``graft migrate``), as deployments expect.
    """
    settings = settings or load_settings()
    engine = make_engine(settings.resolved_database_url)
    embedded = settings.database_url is None
    if migrate or (migrate is None and embedded):
        upgrade_to_head(engine)
    elif not schema_is_current(engine):
        raise InvalidConfig(
            "the database schema is not up to date; run `graft migrate` (or `alembic upgrade head`) first"
        )
    store = ArtifactStore(settings.resolved_artifacts_dir)
    return Runtime(settings, engine, make_session_factory(engine), store)
