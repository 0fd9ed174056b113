"""Alembic migrations: a single head, a clean upgrade → downgrade → upgrade cycle on SQLite and Postgres, and a
schema that matches the ORM models exactly (so a model change without its migration fails here)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from control.migrate import alembic_config, downgrade, upgrade
from control.orm import Base


def _state(url: str) -> tuple[set[str], str | None, list]:
    """(tables, current revision, differences between the database and the ORM models)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn)
            return set(inspect(conn).get_table_names()), context.get_current_revision(), compare_metadata(
                context, Base.metadata)  # fmt: skip
    finally:
        engine.dispose()


def test_single_head():
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, heads


def test_upgrade_downgrade_upgrade_matches_models(database):
    head = ScriptDirectory.from_config(alembic_config(database)).get_current_head()
    model_tables = set(Base.metadata.tables)

    assert _state(database)[0] == set()
    upgrade(database)
    tables, revision, diff = _state(database)
    assert tables == model_tables | {"alembic_version"}
    assert revision == head
    assert diff == []

    downgrade(database)
    tables, revision, _ = _state(database)
    assert tables <= {"alembic_version"} and revision is None

    upgrade(database)
    tables, revision, diff = _state(database)
    assert tables == model_tables | {"alembic_version"} and revision == head
    assert diff == []

    upgrade(database)  # at head already: a no-op, not an error
    assert _state(database)[1] == head
