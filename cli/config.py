"""Where `neatft` finds the service and its key: `OPENAI_BASE_URL` / `OPENAI_API_KEY` (the `openai` SDK's own
variables) override what `neatft login` stored in `$XDG_CONFIG_HOME/neatft/config.json` (`~/.config` without it).
The file holds a secret: it is created with mode 0600 and kept so when rewritten."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # where `scripts/run` serves


class NotLoggedIn(Exception):
    """No API key in the environment or the config file, or a config file that cannot be read."""


@dataclass(frozen=True)
class Credentials:
    base_url: str
    api_key: str


def path() -> Path:
    root = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(root) / "neatft" / "config.json"


def stored() -> dict:
    try:
        saved = json.loads(path().read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        raise NotLoggedIn(f"{path()} is not a neatft config file: run `neatft login` again.")
    return saved


def save(credentials: Credentials) -> Path:
    target = path()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Opened with 0600 from the start (never world-readable, not even for a moment); fchmod for a file that was
    # already there with looser bits.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump({"base_url": credentials.base_url, "api_key": credentials.api_key}, f, indent=2)
        f.write("\n")
    return target


def resolve() -> Credentials:
    saved = stored()
    base_url = os.environ.get("OPENAI_BASE_URL") or saved.get("base_url") or DEFAULT_BASE_URL
    api_key = os.environ.get("OPENAI_API_KEY") or saved.get("api_key")
    if not api_key:
        raise NotLoggedIn(f"No API key: run `neatft login` or set OPENAI_API_KEY (config file: {path()}).")
    return Credentials(base_url.rstrip("/"), api_key)
