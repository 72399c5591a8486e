"""Alembic migrations on fresh databases (PostgreSQL and SQLite): up, down, up again, and no drift.

"No drift" is what ``alembic check`` asserts: autogenerate compares the models with the migrated schema
and must find nothing to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, inspect

from registry.db import make_engine
from registry.migrate import alembic_config, upgrade_to_head
from registry.models import Base
from tests.conftest import create_pg_database, drop_pg_database

CORE_TABLES = {"base_models", "adapters", "adapter_versions", "lineage_edges", "merge_jobs"}
MODEL_TABLES = set(Base.metadata.tables)


@pytest.fixture(params=["postgresql", "sqlite"])
def fresh_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database that no other test uses."""
    is_pg = request.param == "postgresql"
    url = create_pg_database("graft_mig") if is_pg else f"sqlite:///{tmp_path / 'fresh.db'}"
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
        if is_pg:
            drop_pg_database(url)


def migrate(engine: Engine, direction: str, target: str) -> None:
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        getattr(command, direction)(cfg, target)


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def drift(engine: Engine, metadata: MetaData = Base.metadata) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, metadata)


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_the_models_define_the_registry_tables():
    assert CORE_TABLES <= MODEL_TABLES


def test_upgrade_downgrade_upgrade(fresh_engine):
    assert tables(fresh_engine) == set()
    assert current_revision(fresh_engine) is None

    migrate(fresh_engine, "upgrade", "head")
    assert tables(fresh_engine) == MODEL_TABLES | {"alembic_version"}
    assert current_revision(fresh_engine) == head()
    columns = {c["name"] for c in inspect(fresh_engine).get_columns("adapter_versions")}
    assert set(Base.metadata.tables["adapter_versions"].columns.keys()) == columns

    migrate(fresh_engine, "downgrade", "base")
    assert tables(fresh_engine) - {"alembic_version"} == set()
    assert current_revision(fresh_engine) is None

    migrate(fresh_engine, "upgrade", "head")
    assert tables(fresh_engine) == MODEL_TABLES | {"alembic_version"}
    assert current_revision(fresh_engine) == head()
    assert drift(fresh_engine) == []


def test_upgrade_to_head_helper_is_idempotent(fresh_engine):
    upgrade_to_head(fresh_engine)
    upgrade_to_head(fresh_engine)
    assert current_revision(fresh_engine) == head()
    assert tables(fresh_engine) == MODEL_TABLES | {"alembic_version"}


def test_autogenerate_finds_no_difference(fresh_engine):
    migrate(fresh_engine, "upgrade", "head")
    assert drift(fresh_engine) == []


def test_autogenerate_would_notice_a_difference(fresh_engine):
    # The comparison is not vacuous: a model change the migrations lack is reported.
    migrate(fresh_engine, "upgrade", "head")
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    Table("extra", changed, Column("id", Integer, primary_key=True))
    changed.tables["adapters"].append_column(Column("owner", String(50), nullable=True))

    found = drift(fresh_engine, changed)
    kinds = {(d[0], getattr(d[-1], "name", None)) for d in found if isinstance(d, tuple)}
    assert ("add_table", "extra") in kinds
    assert ("add_column", "owner") in kinds


def test_an_empty_database_differs_from_the_models(fresh_engine):
    added = {d[1].name for d in drift(fresh_engine) if isinstance(d, tuple) and d[0] == "add_table"}
    assert added == MODEL_TABLES


def test_foreign_keys_and_unique_constraints_exist(fresh_engine):
    migrate(fresh_engine, "upgrade", "head")
    inspector = inspect(fresh_engine)
    fks = {(fk["constrained_columns"][0], fk["referred_table"]) for fk in inspector.get_foreign_keys("lineage_edges")}
    assert fks == {("child_id", "adapter_versions"), ("parent_id", "adapter_versions")}
    uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("adapter_versions")}
    assert ("adapter_id", "number") in uniques
