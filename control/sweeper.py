"""The temporary-bytes sweeper: `Storage.sweep` at process start and every `sweep_seconds`, in a daemon thread.

The API processes and the workers each run one (api.main's lifespan, worker.app's worker_ready signal), so an
upload cut off by a killed API process, or a checkpoint or adapter half-written by a killed worker, is removed by
whichever process runs next on the volume; the rules for what is abandoned are `Storage.sweep`'s.
"""

from __future__ import annotations

import logging
import threading

from control.settings import Settings
from control.storage import Storage

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, settings: Settings):
        self.root = settings.resolved_artifact_root
        self.max_age, self.every = settings.temp_max_age_seconds, settings.sweep_seconds
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
            Storage(self.root).sweep(self.max_age)
        except OSError:  # the volume is away (or full) for a moment: try again next round
            log.exception("sweeping temporary files failed")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sweep()
