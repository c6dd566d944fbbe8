"""The Celery app: Redis broker, late acks, prefetch 1, requeue on worker loss, time limits.

The worker's main process also runs the reaper (workers/reaper.py), which re-enqueues jobs stranded by
dead workers.
"""

from __future__ import annotations

from workers import runtime  # imports nothing heavy

# passive OpenMP waits and a malloc that reuses freed blocks; before torch is first imported here
runtime.configure()

from typing import Any  # noqa: E402

from celery.signals import worker_ready, worker_shutdown  # noqa: E402

from app import logs  # noqa: E402
from app.queue import make_celery  # noqa: E402
from app.settings import get_settings  # noqa: E402

settings = get_settings()
logs.configure(settings.log_level)
celery_app = make_celery(settings, "amend-worker")
celery_app.conf.include = ["workers.tasks"]
app = celery_app
_reaper: Any = None


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    global _reaper
    from workers.jobs.context import services
    from workers.upkeep.reaper import ReaperThread

    _reaper = ReaperThread(services()[1], celery_app, settings.job_lease_seconds, 2.0 * settings.job_time_limit)
    _reaper.start()


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stopped.set()
