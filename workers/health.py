"""`python -m workers.health`: exit 0 when a worker on this host has a live heartbeat in Redis, 1 otherwise.

The worker image's HEALTHCHECK and the Kubernetes liveness probe run it. It imports no torch: only the settings,
Redis and the heartbeat keys (`app.queue.live_workers`).
"""

from __future__ import annotations

import socket
import sys

import redis

from app.queue import live_workers
from app.settings import get_settings


def main() -> int:
    client = redis.Redis.from_url(get_settings().redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        alive = [w for w in live_workers(client) if w.get("host") == socket.gethostname()]
    except redis.RedisError as error:
        print(f"redis unreachable: {error}", file=sys.stderr)
        return 1
    if not alive:
        print(f"no live worker heartbeat from {socket.gethostname()}", file=sys.stderr)
        return 1
    print(", ".join(f"{w['name']} on {w['device']['device']}" for w in alive))
    return 0


if __name__ == "__main__":
    sys.exit(main())
