"""Public ids: OpenAI-style prefixed random strings. Ordering never relies on them (rows carry `seq`)."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str, sep: str = "-") -> str:
    """`ftjob-…` as OpenAI spells its job ids; `sep="_"` for the ids OpenAI spells with one (`evt_…`)."""
    return f"{prefix}{sep}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
