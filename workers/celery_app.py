"""The Celery app: Redis broker, late acks, prefetch 1, requeue on worker loss, time limits.

The worker's main process also runs the reaper (workers/reaper.py) on a timer of half a job lease.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready, worker_shutdown

from app import logs
from app.queue import make_celery
from app.settings import get_settings

settings = get_settings()
logs.configure(settings.log_level)
celery_app = make_celery(settings, "amend-worker")
celery_app.conf.include = ["workers.tasks"]
app = celery_app
_reaper: Any = None


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    global _reaper
    from workers.pipeline import services
    from workers.reaper import ReaperThread

    _reaper = ReaperThread(services()[1], celery_app, interval=max(settings.job_lease_seconds / 2, 1.0))
    _reaper.start()


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stopped.set()
