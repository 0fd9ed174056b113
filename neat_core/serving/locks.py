"""The model lock: shared by forward passes, exclusive for changes to the model's adapter slots.

Classification passes of different callers run at once (`Scheduler`, "lanes"), so forwards must not exclude each
other, while the adapter cache must still change slot tables only when no forward is reading them. The standard
library has no reader-writer lock, and one this small is clearer than a dependency; writers are preferred (a
waiting writer holds back new readers) so a stream of overlapping passes cannot starve an adapter load.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ModelLock:
    """`with lock:` is exclusive (slot changes, and tests that hold the model); `with lock.shared():` is a forward."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    def __enter__(self) -> ModelLock:
        with self._cond:
            self._writers_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()
