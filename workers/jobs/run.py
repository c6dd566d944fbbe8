"""The job pipeline: load record -> fetch inputs -> run method -> check -> store -> finish.

Idempotent by construction: every output key derives from the job id, a job whose output adapter already
exists finishes without recomputing, and a lease makes a second copy of a running job a no-op. Errors end a
job with a stable code: `invalid_input` (the spec or the adapters cannot be merged), `storage_unavailable`
(after retries with backoff), `worker_crashed` (the job took its worker down too many times),
`internal_error` (anything else, with its message).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from app.adapter_store import store_adapter
from app.errors import AmendError, NotFound, ServiceUnavailable
from app.records import Records, add_event, now
from app.schemas.adapters import AdapterRecord
from app.schemas.jobs import FINAL_STATES, JobError, JobRecord, JobResult, MergeJobCreate
from app.settings import Settings, get_settings
from app.storage import Storage, keys
from workers.upkeep.lease import Lease
from workers.upkeep.scratch import job_scratch

log = logging.getLogger(__name__)
STORAGE_RETRIES = 4


class JobCancelled(Exception):
    """The job's cancel flag was seen between two steps."""


class LeaseLost(Exception):
    """This worker's lease on the job expired; another copy owns the job now, so this one stops quietly."""


class InputRejected(ValueError):
    """The job's inputs cannot be processed; retrying will not help."""


@lru_cache
def services() -> tuple[Settings, Records]:
    settings = get_settings()
    index = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    return settings, Records(Storage(settings), index)


def output_adapter_id(job_id: str) -> str:
    """The job's output adapter id: deterministic, and time-ordered like the job id it comes from."""
    return "ad_" + job_id.split("_", 1)[1]


@dataclass
class JobContext:
    job: JobRecord
    records: Records
    settings: Settings
    lease: Lease
    _last_write: float = 0.0

    def progress(self, fraction: float, stage: str) -> None:
        """Report progress (cheap: Redis only, throttled) and stop here if the job was cancelled."""
        self.check_cancelled()
        current = time.monotonic()
        if current - self._last_write > 0.25 or fraction >= 1.0:
            self._last_write = current
            self.records.set_progress(self.job.id, min(max(fraction, 0.0), 1.0), stage)

    def should_cancel(self) -> bool:
        return self.lease.lost or bool(self.records.index.exists(self.records.cancel_key(self.job.id)))

    def check_cancelled(self) -> None:
        if self.lease.lost:
            raise LeaseLost
        if self.should_cancel():
            raise JobCancelled


def run_job(job_id: str) -> None:
    settings, records = services()
    try:
        job = records.get_job(job_id)
    except NotFound:
        log.warning("job record not found; dropping the message", extra={"job_id": job_id})
        return
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
    job = records.mutate_job(job_id, lambda r: _start(r, settings.job_max_attempts))
    if job.state != "running":
        return
    context = JobContext(job, records, settings, lease)
    log.info("job started", extra={"job_id": job_id, "attempt": job.attempts, "method": job.method})
    for attempt in range(STORAGE_RETRIES + 1):
        try:
            result = _existing_result(records, job) or HANDLERS[job.type](context)
            _finish(records, job_id, "succeeded", result=result)
            log.info("job succeeded", extra={"job_id": job_id})
            return
        except JobCancelled:
            _finish(records, job_id, "cancelled")
            return
        except LeaseLost:
            log.warning("lease lost; leaving the job to its new owner", extra={"job_id": job_id})
            return
        except (InputRejected, ValidationError, ValueError) as error:
            _finish(records, job_id, "failed", error=JobError(code="invalid_input", message=_message(error)))
            return
        except ServiceUnavailable as error:  # storage or Redis: retry with backoff, then fail with its code
            if attempt == STORAGE_RETRIES:
                _finish(records, job_id, "failed", error=JobError(code=error.code, message=error.message))
                return
            delay = min(2.0 * 2**attempt, 30.0)
            log.warning("service unavailable; retrying", extra={"job_id": job_id, "delay": delay, "code": error.code})
            with suppress(ServiceUnavailable):
                records.set_progress(job_id, 0.0, f"{error.message}; retrying in {delay:.0f} s")
            time.sleep(delay)
        except AmendError as error:  # a typed refusal (quota, invalid adapter, ...): its own stable code
            _finish(records, job_id, "failed", error=JobError(code=error.code, message=error.message))
            return
        except Exception as error:  # noqa: BLE001 - the job records what went wrong
            log.exception("job failed", extra={"job_id": job_id})
            _finish(records, job_id, "failed", error=JobError(code="internal_error", message=_message(error)))
            return


def _message(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text[:1000]


def _start(record: JobRecord, max_attempts: int) -> bool:
    if record.state in FINAL_STATES:
        return False
    if record.cancel_requested:
        record.state, record.finished_at = "cancelled", now()
        add_event(record, "cancelled")
        return True
    if record.attempts >= max_attempts:
        record.state, record.finished_at = "failed", now()
        record.error = JobError(
            code="worker_crashed",
            message=f"the job stopped its worker {record.attempts} times; giving up after {max_attempts} attempts",
        )
        add_event(record, "failed: worker crashed repeatedly")
        return True
    record.state = "running"
    record.attempts += 1
    record.started_at = record.started_at or now()
    add_event(record, f"running (attempt {record.attempts})")
    return True


def _finish(
    records: Records, job_id: str, state: str, result: JobResult | None = None, error: JobError | None = None
) -> None:
    def change(record: JobRecord) -> bool:
        if record.state in FINAL_STATES:
            return False
        record.state = state  # type: ignore[assignment]
        record.finished_at = now()
        if state == "succeeded":
            record.progress = 1.0
        record.result, record.error = result, error
        add_event(record, state if error is None else f"{state}: {error.code}")
        return True

    records.mutate_job(job_id, change)


def _existing_result(records: Records, job: JobRecord) -> JobResult | None:
    """A redelivered job whose output is already published finishes without recomputing."""
    if job.type == "unlearn":
        from workers.jobs.unlearn import existing_result

        return existing_result(records, job)
    report_key = keys.job(job.tenant, job.id, "results/report.json")
    try:
        adapter = records.get_adapter(job.tenant, output_adapter_id(job.id))
        report = records.storage.get_json(report_key)
    except NotFound:
        return None
    return JobResult(
        adapter_id=adapter.id, adapter_ids=[adapter.id], report=report.get("summary"), report_key=report_key
    )


# -- merge --------------------------------------------------------------------------------------------


def _fetch_adapter(records: Records, adapter: AdapterRecord, into: Path) -> tuple[dict[str, Any], Path]:
    config = records.storage.get_json(keys.adapter(adapter.tenant, adapter.id, "adapter_config.json"))
    weights = into / adapter.id / "adapter_model.safetensors"
    records.storage.download(keys.adapter(adapter.tenant, adapter.id, "adapter_model.safetensors"), weights)
    return config, weights


def publish_adapter(
    context: JobContext, directory: Path, name: str, report: dict[str, Any]
) -> JobResult:
    """Store an output adapter and its report under keys derived from the job id; the record goes last."""
    job, records, settings = context.job, context.records, context.settings
    adapter_id = output_adapter_id(job.id)
    report_key = keys.job(job.tenant, job.id, "results/report.json")
    records.storage.put_json(report_key, report)
    store_adapter(
        records,
        settings,
        tenant=job.tenant,
        adapter_id=adapter_id,
        name=name,
        config=json.loads((directory / "adapter_config.json").read_text()),
        weights=directory / "adapter_model.safetensors",
        source_job_id=job.id,
    )
    return JobResult(
        adapter_id=adapter_id, adapter_ids=[adapter_id], report=report.get("summary"), report_key=report_key
    )


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_merge(context: JobContext) -> JobResult:
    from workers.formats.lora import merge_adapter_files

    job, records = context.job, context.records
    spec = MergeJobCreate.model_validate(job.spec)
    with job_scratch(job.id) as scratch:
        root = Path(scratch)
        inputs = []
        for position, item in enumerate(spec.adapters):
            try:
                adapter = records.get_adapter(job.tenant, item.id)
            except NotFound:
                raise InputRejected(f"adapter {item.id} no longer exists") from None
            config, weights = _fetch_adapter(records, adapter, root / "inputs")
            inputs.append((config, weights, item.weight))
            context.progress(0.3 * (position + 1) / len(spec.adapters), f"fetched adapter {position + 1}")
        out_dir = root / "output"
        out_dir.mkdir()

        def engine_progress(fraction: float, stage: str) -> None:
            context.progress(0.3 + 0.6 * fraction, stage)

        with torch_threads(context.settings.merge_threads):
            report = merge_adapter_files(
                inputs, spec.method, spec.params, spec.output.model_dump(), out_dir, progress=engine_progress
            )
        context.progress(0.92, "storing the merged adapter")
        return publish_adapter(context, out_dir, spec.output.name, report)


def run_unlearn(context: JobContext) -> JobResult:
    from workers.jobs.unlearn import run_unlearn as handler  # torch, transformers and peft load only here

    return handler(context)


HANDLERS: dict[str, Callable[[JobContext], JobResult]] = {"merge": run_merge, "unlearn": run_unlearn}
