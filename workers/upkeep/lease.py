"""An application-level lease per running job, renewed by a heartbeat thread.

Redis redelivers an unacknowledged task only after its visibility timeout, and may hand a long job to a
second worker while the first still runs it. The lease closes both gaps: a second copy of a running job
finds the lease held and does nothing, and the reaper re-enqueues a `running` job whose lease expired
(its worker died) long before the broker would.
"""

from __future__ import annotations

import logging
import secrets
import threading

import redis

from app.records import PREFIX

log = logging.getLogger(__name__)


def lease_key(job_id: str) -> str:
    return f"{PREFIX}lease:{job_id}"


_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end
"""


class Lease:
    def __init__(self, index: redis.Redis, job_id: str, seconds: int) -> None:
        self.index = index
        self.key = lease_key(job_id)
        self.job_id = job_id
        self.seconds = seconds
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> bool:
        if not self.index.set(self.key, self.token, nx=True, ex=self.seconds):
            return False
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.job_id}", daemon=True)
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.index.eval(_RENEW, 1, self.key, self.token, int(self.seconds * 1000)):
                    self.lost = True
                    log.warning("job lease lost", extra={"job_id": self.job_id})
                    return
            except redis.RedisError:
                log.warning("could not renew the job lease", extra={"job_id": self.job_id})

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.index.eval(_RELEASE, 1, self.key, self.token)
        except redis.RedisError:
            log.warning("could not release the job lease", extra={"job_id": self.job_id})
