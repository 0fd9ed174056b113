"""Alembic environment: the URL comes from the one settings object (or `-x url=...` / config attribute)."""

from __future__ import annotations

from alembic import context

from control.db import make_engine
from control.orm import Base
from control.settings import get_settings

config = context.config
url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
url = url or get_settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        # batch mode: SQLite cannot ALTER most things in place; Alembic copies the table instead.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
