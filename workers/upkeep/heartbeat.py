"""The worker's heartbeat: every `AMEND_WORKER_HEARTBEAT_SECONDS` the process that runs jobs writes who it is
to Redis — its device, device name and memory, its queues — with a time to live of three periods.

`GET /v1/stats` lists the live ones (`app.queue.live_workers`), and the API routes unlearning jobs to the
GPU-only queue while any GPU worker's heartbeat is live (`app.queue.route`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

import redis

from app import metrics
from app.queue import GPU_WORKERS_KEY, WORKERS_KEY, worker_key
from workers.device import WorkerDevice

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, client: redis.Redis, name: str, device: WorkerDevice, queues: list[str],
                 period: float) -> None:
        super().__init__(name="amend-heartbeat", daemon=True)
        self.client, self.worker, self.device, self.queues, self.period = client, name, device, queues, period
        self.started_at = time.time()
        self.stopped = threading.Event()

    def payload(self) -> dict[str, Any]:
        return {"name": self.worker, "host": socket.gethostname(), "pid": os.getpid(), "queues": self.queues,
                "device": self.device.describe(), "started_at": self.started_at, "seen_at": time.time()}

    def beat(self) -> None:
        ttl = 3 * self.period
        expiry = time.time() + ttl
        pipe = self.client.pipeline()
        pipe.set(worker_key(self.worker), json.dumps(self.payload()), ex=int(ttl) + 1)
        pipe.zadd(WORKERS_KEY, {self.worker: expiry})
        if self.device.kind == "cuda":
            pipe.zadd(GPU_WORKERS_KEY, {self.worker: expiry})
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", time.time())
        pipe.zremrangebyscore(GPU_WORKERS_KEY, "-inf", time.time())
        pipe.execute()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.beat()
                metrics.worker_errors.flush(self.client)  # the errors this process met while Redis was away
            except redis.RedisError as error:  # Redis away: the next beat tries again
                metrics.worker_errors.count(self.client, error)
                log.warning("heartbeat failed", extra={"error": str(error)})
            self.stopped.wait(self.period)

    def stop(self) -> None:
        self.stopped.set()
        try:
            pipe = self.client.pipeline()
            pipe.zrem(WORKERS_KEY, self.worker)
            pipe.zrem(GPU_WORKERS_KEY, self.worker)
            pipe.delete(worker_key(self.worker))
            pipe.execute()
        except redis.RedisError:
            pass
