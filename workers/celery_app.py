"""The Celery app: Redis broker, late acks, prefetch 1, requeue on worker loss, time limits.

The worker's main process also marks each job it receives as delivered to it, and runs the reaper
(workers/reaper.py), which keeps this worker's liveness key fresh and re-enqueues jobs stranded by dead
workers.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import task_received, worker_ready, worker_shutdown

from app import logs
from app.queue import make_celery
from app.settings import get_settings

settings = get_settings()
logs.configure(settings.log_level)
celery_app = make_celery(settings, "amend-worker")
celery_app.conf.include = ["workers.tasks"]
app = celery_app
log = logging.getLogger(__name__)
_reaper: Any = None


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    global _reaper
    from workers.pipeline import services
    from workers.reaper import ReaperThread

    _reaper = ReaperThread(services()[1], celery_app, sender.hostname, settings.job_lease_seconds)
    _reaper.beat()
    _reaper.start()


@task_received.connect
def _mark_delivered(request: Any = None, **_: Any) -> None:
    import redis

    from workers.pipeline import services
    from workers.reaper import delivered_key

    if _reaper is None or request is None or not request.args:
        return
    try:
        services()[1].index.set(delivered_key(str(request.args[0])), _reaper.worker, ex=24 * 3600)
    except redis.RedisError as error:
        log.warning("could not mark a job delivered", extra={"error": str(error)})


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stopped.set()
