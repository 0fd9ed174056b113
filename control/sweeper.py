"""The sweeper: `Storage.sweep` (temporary bytes) and `attempts.prune` (the attempt folders a finished job no longer
needs) at process start and every `sweep_seconds`, in a daemon thread.

The API processes and the workers each run one (api.main's lifespan, worker.app's worker_ready signal), so an
upload cut off by a killed API process, or a checkpoint or adapter half-written by a killed worker, is removed by
whichever process runs next on the volume; the rules for what is abandoned are `Storage.sweep`'s, and for which
attempt folders go, `control.attempts`'.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import DBAPIError, OperationalError

from control import attempts
from control.db import session_scope
from control.settings import Settings
from control.storage import Storage

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, settings: Settings):
        self.root, self.url = settings.resolved_artifact_root, settings.resolved_database_url
        self.max_age, self.every = settings.temp_max_age_seconds, settings.sweep_seconds
        # A finished job's lost attempts go once any worker still running one has had a lease's time to notice.
        self.attempts_grace = settings.lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="temp-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self.sweep()  # at start, before this process writes anything of its own
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def sweep(self) -> None:
        try:
            storage = Storage(self.root)
            storage.sweep(self.max_age)
        except OSError:  # the volume is away (or full) for a moment: try again next round
            log.exception("sweeping temporary files failed")
            return
        try:
            with session_scope(self.url) as session:
                attempts.prune(session, storage, grace=self.attempts_grace)
        except (OSError, OperationalError, DBAPIError):  # the volume or the database is away: next round
            log.exception("removing the attempt folders of finished jobs failed")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sweep()
