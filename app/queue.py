"""The Celery configuration shared by the API (which only sends) and the workers (which run), and the queues.

The API enqueues by task name, so it never imports `workers` or torch.

Queues by device class: `amend.merge` and `amend.compress` are served by every worker; `amend.unlearn` by GPU
workers and, when `AMEND_UNLEARN_ON_CPU` is true, by CPU workers; `amend.unlearn.gpu` by GPU workers only.
An unlearning job goes to `amend.unlearn.gpu` while any GPU worker is alive (its heartbeat in Redis), else to
`amend.unlearn`, so it reaches a GPU when one exists and a CPU worker (if allowed) when none does.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from typing import Any, Literal

import redis
from celery import Celery

from app.settings import Settings

RUN_JOB = "workers.run_job"
REAP = "workers.reap"
JOB_TYPES = ("merge", "unlearn", "compress")
DeviceClass = Literal["cpu", "cuda"]
GPU_PREFERRED = ("unlearn",)  # job types that go to GPU workers whenever one is alive
GPU_SUFFIX = ".gpu"
WORKERS_KEY = "amend:workers"  # sorted set: worker name -> expiry of its last heartbeat (unix seconds)
GPU_WORKERS_KEY = "amend:workers:cuda"


def worker_key(name: str) -> str:
    """The JSON a worker's heartbeat writes: its device, device name, memory, queues."""
    return f"amend:worker:{name}"


def queue_for(job_type: str, gpu_only: bool = False) -> str:
    return f"amend.{job_type}" + (GPU_SUFFIX if gpu_only and job_type in GPU_PREFERRED else "")


def queues_for_device(device_class: DeviceClass, unlearn_on_cpu: bool) -> list[str]:
    """The queues a worker of this device class subscribes to."""
    if device_class == "cuda":
        return [queue_for(t) for t in JOB_TYPES] + [queue_for(t, gpu_only=True) for t in GPU_PREFERRED]
    return [queue_for(t) for t in JOB_TYPES if t not in GPU_PREFERRED or unlearn_on_cpu]


def all_queues() -> list[str]:
    return queues_for_device("cuda", True)


def gpu_workers_alive(client: redis.Redis) -> bool:
    return bool(client.zcount(GPU_WORKERS_KEY, time.time(), "+inf"))


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """The heartbeats of the workers alive now (each as its worker wrote it)."""
    found: Any = client.zrangebyscore(WORKERS_KEY, time.time(), "+inf")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in found]
    values = client.mget([worker_key(name) for name in names]) if names else []
    return [json.loads(value) for value in values if value]


@lru_cache(maxsize=8)
def _broker_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.job_time_limit + 60,
        "task_soft_time_limit": settings.job_time_limit,
        "task_default_queue": queue_for("merge"),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # a redelivery safety net only: leases in Redis (workers/lease.py) recover a dead worker's job
            # much sooner, and a second copy of a running job is a no-op.
            "visibility_timeout": settings.job_time_limit + 600,
        },
        "worker_hijack_root_logger": False,
        # beat (celery-redbeat) looks for due entries at least this often, so a schedule created or retimed
        # through the API is seen within seconds (its lock then expires 5x this after a beat dies)
        "beat_max_loop_interval": 5,
        "redbeat_redis_url": settings.redis_url,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def make_celery(settings: Settings, name: str = "amend") -> Celery:
    celery = Celery(name)
    celery.conf.update(celery_config(settings))
    return celery


def route(celery: Celery, job_type: str) -> str:
    """The queue for a job of this type now: a GPU-preferring type goes to the GPU-only queue while a GPU
    worker is alive. If Redis cannot say, the shared queue (every worker that may run the type serves it)."""
    if job_type not in GPU_PREFERRED:
        return queue_for(job_type)
    try:
        gpu = gpu_workers_alive(_broker_client(str(celery.conf.broker_url)))
    except redis.RedisError:
        gpu = False
    return queue_for(job_type, gpu_only=gpu)


def enqueue(
    celery: Celery, job_id: str, job_type: str, tenant: str | None = None, request_id: str | None = None
) -> None:
    """Send the job's message. Its `kwargsrepr` (shown only in logs; the task takes no kwargs) is the job's log
    context as JSON, so the worker's "received" line — written before the job's record is read — carries
    `job_id`, `tenant` and `request_id` like every later line of the job (`app.logs.JsonFormatter`)."""
    context = {"job_id": job_id, "tenant": tenant, "request_id": request_id}
    kwargsrepr = json.dumps({key: value for key, value in context.items() if value})
    celery.send_task(RUN_JOB, args=[job_id], kwargsrepr=kwargsrepr, queue=route(celery, job_type))
