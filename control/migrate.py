"""Schema migrations as a step of their own (never on import): `python -m control.migrate [upgrade|downgrade]`."""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

from control.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]


def alembic_config(url: str | None = None) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = url or get_settings().resolved_database_url
    return config


def upgrade(url: str | None = None) -> None:
    command.upgrade(alembic_config(url), "head")


def downgrade(url: str | None = None) -> None:
    command.downgrade(alembic_config(url), "base")


if __name__ == "__main__":
    {"upgrade": upgrade, "downgrade": downgrade}[sys.argv[1] if len(sys.argv) > 1 else "upgrade"]()
