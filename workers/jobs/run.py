"""Running one job: load the record, take the lease, dispatch by type, map what went wrong to a code, finish.

Idempotent by construction: every output key derives from the job id, a job whose output already exists
finishes without recomputing (each type's `existing_result`), and a lease makes a second copy of a running job
a no-op. State changes go through `app.jobs.lifecycle` only.

`ERROR_CODES` is the one table from an exception to a job error code. An exception it does not name is a
defect, not the user's fault: the job fails with `internal_error` and the exception's type, never with
`invalid_input`. Storage or Redis outages (`ServiceUnavailable`) are retried with backoff first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from app import logs, metrics
from app.errors import AmendError, NotFound, ServiceUnavailable
from app.jobs import lifecycle
from app.records import Records
from app.schemas.jobs import FINAL_STATES, JobError, JobResult
from app.settings import Settings
from workers.device import InsufficientDeviceMemory, check_fits, current
from workers.engines.compress.errors import CompressInputError, CompressNumericError
from workers.engines.merge.errors import MergeInputError, MergeNumericError
from workers.engines.unlearn.errors import UnlearnError
from workers.formats.compact import CompactFormatError
from workers.formats.hf_models import HfFormatError
from workers.formats.lora import AdapterFormatError
from workers.formats.tensor_files import TensorFileError
from workers.jobs import compress, merge, unlearn
from workers.jobs.context import InputRejected, JobCancelled, JobContext, LeaseLost, services
from workers.jobs.memory import estimate
from workers.upkeep.lease import Lease

log = logging.getLogger(__name__)
STORAGE_RETRIES = 4


@dataclass(frozen=True)
class JobType:
    run: Callable[[JobContext], JobResult]
    existing_result: Callable[[JobContext], JobResult | None]


HANDLERS: dict[str, JobType] = {
    "merge": JobType(merge.run, merge.existing_result),
    "unlearn": JobType(unlearn.run, unlearn.existing_result),
    "compress": JobType(compress.run, compress.existing_result),
}


def _own_code(error: BaseException) -> str:
    return str(getattr(error, "code", "invalid_input"))


# exception type -> its job error code (a function of the exception when the error carries its own code);
# the first matching row wins, so subclasses come before their bases
ERROR_CODES: list[tuple[type[BaseException], Callable[[BaseException], str]]] = [
    (InputRejected, _own_code),  # invalid_input, input_corrupted
    (InsufficientDeviceMemory, _own_code),  # insufficient_device_memory: refused before anything is loaded
    (UnlearnError, _own_code),  # unlearn_missing_input, unlearn_unsupported_family, unlearn_non_finite,
    # goal_not_met (GoalNotMet: a job with require_goal that did not reach its goal), ...
    (MergeInputError, lambda _: "invalid_input"),
    (MergeNumericError, lambda _: "merge_non_finite"),
    (CompressInputError, lambda _: "invalid_input"),
    (CompressNumericError, lambda _: "compress_non_finite"),
    (CompactFormatError, lambda _: "invalid_input"),
    (AdapterFormatError, lambda _: "invalid_input"),
    (HfFormatError, lambda _: "invalid_input"),
    (TensorFileError, lambda _: "invalid_input"),
    (ValidationError, lambda _: "invalid_input"),  # a stored spec that no longer validates
    (AmendError, _own_code),  # a typed refusal from the shared domain (quota, invalid adapter, ...)
]


def error_for(error: BaseException) -> JobError:
    """The job error for an exception a handler raised: its code from `ERROR_CODES`, else `internal_error`."""
    for kind, code in ERROR_CODES:
        if isinstance(error, kind):
            message = getattr(error, "message", None) or str(error) or type(error).__name__
            return JobError(code=code(error), message=message[:1000])
    return JobError(code="internal_error", message=f"{type(error).__name__}: {error}"[:1000])


def run_job(job_id: str) -> None:
    settings, records = services()
    try:
        _run(job_id, settings, records)
    except (ServiceUnavailable, redis.RedisError) as error:  # outside an attempt: the record, the lease, the start
        metrics.worker_errors.count(records.index, error)
        raise


def _run(job_id: str, settings: Settings, records: Records) -> None:
    try:
        job = records.get_job(job_id)
    except NotFound:
        log.warning("job record not found; dropping the message", extra={"job_id": job_id})
        return
    logs.bind(tenant=job.tenant, request_id=job.request_id)  # the submitting request's id, when it had one
    if job.state in FINAL_STATES:
        return
    lease = Lease(records.index, job_id, settings.job_lease_seconds)
    if not lease.acquire():
        log.info("job is running elsewhere; this copy does nothing", extra={"job_id": job_id})
        return
    try:
        _run_leased(job_id, settings, records, lease)
    finally:
        lease.release()


def _run_leased(job_id: str, settings: Settings, records: Records, lease: Lease) -> None:
    job = lifecycle.start(records, job_id, settings.job_max_attempts)
    if job.state != "running":
        return
    context = JobContext(job, records, settings, lease)
    handler = HANDLERS[job.type]
    log.info("job started", extra={"job_id": job_id, "attempt": job.attempts, "method": job.method})
    for attempt in range(STORAGE_RETRIES + 1):
        try:
            result = handler.existing_result(context)
            if result is None:
                check_fits(*estimate(context), current(), settings)  # before anything is loaded
                result = handler.run(context)
            lifecycle.finish(records, job_id, "succeeded", result=result)
            log.info("job succeeded", extra={"job_id": job_id})
            return
        except JobCancelled:
            lifecycle.finish(records, job_id, "cancelled")
            return
        except LeaseLost:
            log.warning("lease lost; leaving the job to its new owner", extra={"job_id": job_id})
            return
        except ServiceUnavailable as error:  # storage or Redis: retry with backoff, then fail with its code
            metrics.worker_errors.count(records.index, error)
            if attempt == STORAGE_RETRIES:
                lifecycle.finish(records, job_id, "failed", error=JobError(code=error.code, message=error.message))
                return
            delay = min(2.0 * 2**attempt, 30.0)
            log.warning("service unavailable; retrying", extra={"job_id": job_id, "delay": delay, "code": error.code})
            with suppress(ServiceUnavailable):
                records.set_progress(job_id, 0.0, f"{error.message}; retrying in {delay:.0f} s", job.tenant)
            time.sleep(delay)
        except Exception as error:  # noqa: BLE001 - the job records what went wrong, through one table
            job_error = error_for(error)
            if job_error.code == "internal_error":
                log.exception("job failed", extra={"job_id": job_id})
            else:
                log.info("job refused its inputs", extra={"job_id": job_id, "code": job_error.code})
            lifecycle.finish(records, job_id, "failed", error=job_error)
            return
