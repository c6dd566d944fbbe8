"""The Celery app: Redis broker, late acks, prefetch 1, requeue on worker loss, time limits.

The worker's main process also runs the reaper (workers/reaper.py), which re-enqueues jobs stranded by
dead workers.

Queues by device class: the main process learns its device class from `AMEND_DEVICE` without creating a CUDA
context (`workers.device.device_class`) and subscribes to the queues that class serves
(`app.queue.queues_for_device`), unless `-Q` names others. The process that runs jobs (the prefork child)
resolves the device fully, logs it, and reports it in its heartbeat (`workers/upkeep/heartbeat.py`).
"""

from __future__ import annotations

from workers import runtime  # imports nothing heavy

# passive OpenMP waits and a malloc that reuses freed blocks; before torch is first imported here
runtime.configure()

import logging  # noqa: E402
import os  # noqa: E402
from typing import Any  # noqa: E402

from celery.signals import (  # noqa: E402
    celeryd_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from kombu import Queue  # noqa: E402

from app import logs  # noqa: E402
from app.queue import make_celery, queues_for_device  # noqa: E402
from app.settings import get_settings  # noqa: E402
from workers.device import device_class  # noqa: E402

settings = get_settings()
logs.configure(settings.log_level)
celery_app = make_celery(settings, "amend-worker")
celery_app.conf.include = ["workers.tasks"]
DEVICE_CLASS = device_class(settings.device)
QUEUES = queues_for_device(DEVICE_CLASS, settings.unlearn_on_cpu)
celery_app.conf.task_queues = [Queue(name) for name in QUEUES]
app = celery_app
_reaper: Any = None
_heartbeat: Any = None
_node = {"name": ""}


@celeryd_init.connect
def _remember_node(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Runs in the main process before the pool forks: the node name, and the queues really consumed."""
    _node["name"] = str(sender)
    logging.getLogger(__name__).info("worker starting", extra={
        "device_spec": settings.device, "device_class": DEVICE_CLASS, "queues": QUEUES})


@worker_process_init.connect
def _start_heartbeat(**_: Any) -> None:
    """In the process that runs jobs: resolve the device once (logged), then report it every few seconds."""
    global _heartbeat
    from workers.device import configure_determinism, current
    from workers.jobs.context import services
    from workers.upkeep.heartbeat import Heartbeat

    configure_determinism(settings.deterministic)  # before the device resolves (cuBLAS reads its workspace then)
    queues = sorted(queue.name for queue in celery_app.amqp.queues.consume_from.values()) or QUEUES
    name = f"{_node['name'] or 'worker'}#{os.getpid()}"
    _heartbeat = Heartbeat(services()[1].index, name, current(), queues, settings.worker_heartbeat_seconds)
    _heartbeat.start()


@worker_process_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


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
