"""What a job handler works with: the `JobContext` (record, stores, lease, progress, cancel), the typed job
errors that end a job with a stable code, and the service handles a worker process shares.

The errors here are the handlers' own; `workers/jobs/run.py` holds the one table that maps these and the
engines' and formats' errors to job error codes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import redis

from app import metrics
from app.errors import AmendError
from app.jobs import hooks, lifecycle
from app.records import Records
from app.schemas.jobs import JobRecord
from app.settings import Settings, get_settings
from workers.upkeep.lease import Lease

log = logging.getLogger(__name__)
EVENT_TICK_SECONDS = 30.0  # a running job's progress reaches its event log at least this often


class JobCancelled(Exception):
    """The job's cancel flag was seen between two steps."""


class LeaseLost(Exception):
    """This worker's lease on the job expired; another copy owns the job now, so this one stops quietly."""


class InputRejected(Exception):
    """The job's inputs cannot be processed (gone, or not what the job needs); retrying will not help."""

    code = "invalid_input"


class InputCorrupted(InputRejected):
    """A fetched input's bytes do not match the SHA-256 recorded when it was stored."""

    code = "input_corrupted"


@lru_cache
def services() -> tuple[Settings, Records]:
    settings = get_settings()
    records = Records.connect(settings, socket_timeout=10.0)
    hooks.install(records, settings)  # metrics and webhooks on every state change this worker makes
    return settings, records


@dataclass
class JobContext:
    job: JobRecord
    records: Records
    settings: Settings
    lease: Lease
    _last_write: float = 0.0
    _last_event: float = 0.0
    _last_event_fraction: float = 0.0

    def progress(self, fraction: float, stage: str, force: bool = False) -> None:
        """Report progress (cheap: Redis only, throttled) and stop here if the job was cancelled. The stage
        text carries the numbers (`step 40/200, loss 2.31`, `module 12/30`); a tick also goes to the job's
        event log every `EVENT_TICK_SECONDS` or each tenth of the way, whichever comes first after the other.
        `force`: a phase boundary (fetching, merging, storing), shown at once rather than throttled."""
        self.check_cancelled()
        current = time.monotonic()
        fraction = min(max(fraction, 0.0), 1.0)
        if current - self._last_write > 0.25 or fraction >= 1.0 or force:
            self._last_write = current
            self.records.set_progress(self.job.id, fraction, stage, self.job.tenant)
        if fraction < 1.0 and (current - self._last_event > EVENT_TICK_SECONDS
                               or fraction - self._last_event_fraction >= 0.1):
            self._last_event, self._last_event_fraction = current, fraction
            try:
                lifecycle.note(self.records, self.job.id, f"progress {fraction:.0%}: {stage[:200]}", fraction)
            except (AmendError, redis.RedisError) as error:  # a missed tick never fails the job
                metrics.worker_errors.count(self.records.index, error)
                log.warning("progress event not recorded", extra={"job_id": self.job.id, "error": str(error)})

    def should_cancel(self) -> bool:
        return self.lease.lost or bool(self.records.index.exists(self.records.cancel_key(self.job.id)))

    def check_cancelled(self) -> None:
        if self.lease.lost:
            raise LeaseLost
        if self.should_cancel():
            raise JobCancelled
