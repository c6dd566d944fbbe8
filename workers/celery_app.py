"""The Celery app: Redis broker, late acks, prefetch 1, requeue on worker loss, time limits."""

from __future__ import annotations

from app import logs
from app.queue import make_celery
from app.settings import get_settings

settings = get_settings()
logs.configure(settings.log_level)
celery_app = make_celery(settings, "amend-worker")
celery_app.conf.include = ["workers.tasks"]
app = celery_app
