"""Public ids: OpenAI-style prefixed random strings. Ordering never relies on them (rows carry `seq`)."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
