"""Prometheus metrics: job counters in Redis, request latency in the API process, one `/metrics` text.

Why Redis and not prometheus-client's multiprocess directory: job state changes happen in the API (submit,
cancel) and in every worker process, and workers run on other machines (GPU nodes), where a shared
directory does not exist. Every one of those processes already writes the job's record to the same Redis in
the same transition, so `lifecycle.on_change` adds one pipelined HINCRBY per transition there
(`record_transition`), and `/metrics` on any API replica reads the same totals: counters that survive
worker restarts, no pushgateway, nothing to aggregate. Queue depths and worker heartbeats are read from
Redis at scrape time.

API request latency (by route template) and the API's Redis/storage errors stay in the API process's own
registry: writing Redis on every request would make the cheap polling path dear, and each API replica is
scraped on its own, as usual. The workers' Redis/storage errors go to Redis like the job counters
(`WorkerErrors`); one met while Redis itself is away is kept in the worker's process and written once Redis
answers again (the heartbeat tries every period).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import AmendError
from app.queue import all_queues, live_workers
from app.schemas.jobs import FINAL_STATES, JobRecord, JobState

log = logging.getLogger(__name__)

KEY = "amend:metrics"
JOBS = f"{KEY}:jobs"  # hash "submitted|type|method" and "finished|type|method|outcome" -> count
RUNNING = f"{KEY}:running"  # hash "type|method" -> jobs running now
TENANT_STATES = f"{KEY}:tenant:"  # + tenant: hash "state|type" -> jobs in that state now
WORKER_ERRORS = f"{KEY}:worker_errors"  # hash backend ("redis", "storage") -> errors workers met
BACKENDS = {"redis_unavailable": "redis", "storage_unavailable": "storage"}  # an error's code -> its backend
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
HISTOGRAMS = {"duration": DURATION_BUCKETS, "queue_wait": WAIT_BUCKETS}


def _histogram_key(name: str) -> str:
    return f"{KEY}:hist:{name}"  # hash "type|method|<bucket index or 'inf'>", "type|method|sum"


def _observe(pipe: Any, name: str, labels: str, value: float) -> None:
    buckets = HISTOGRAMS[name]
    slot = next((str(i) for i, bound in enumerate(buckets) if value <= bound), "inf")
    pipe.hincrby(_histogram_key(name), f"{labels}|{slot}", 1)
    pipe.hincrbyfloat(_histogram_key(name), f"{labels}|sum", value)


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    return max(0.0, (later - earlier).total_seconds()) if later and earlier else None


def record_transition(client: redis.Redis, record: JobRecord, previous: JobState | None) -> None:
    """Count one state change (a `lifecycle.on_change` listener): one pipelined round trip."""
    labels = f"{record.type}|{record.method}"
    pipe = client.pipeline(transaction=False)
    tenant = TENANT_STATES + record.tenant
    pipe.hincrby(tenant, f"{record.state}|{record.type}", 1)
    if previous is None:
        pipe.hincrby(JOBS, f"submitted|{labels}", 1)
    else:
        pipe.hincrby(tenant, f"{previous}|{record.type}", -1)
    if record.state == "running":
        pipe.hincrby(RUNNING, labels, 1)
        wait = _seconds(record.started_at, record.created_at)
        if wait is not None:
            _observe(pipe, "queue_wait", labels, wait)
    if previous == "running":
        pipe.hincrby(RUNNING, labels, -1)
    if record.state in FINAL_STATES:
        pipe.hincrby(JOBS, f"finished|{labels}|{record.state}", 1)
        duration = _seconds(record.finished_at, record.started_at)
        if duration is not None and previous == "running":
            _observe(pipe, "duration", labels, duration)
    pipe.execute()


def tenant_job_counts(client: redis.Redis, tenant: str) -> dict[str, dict[str, int]]:
    """{state: {type: jobs}} for one tenant, from the counts `record_transition` keeps (zeros dropped)."""
    counts: dict[str, dict[str, int]] = {}
    raw: Any = client.hgetall(TENANT_STATES + tenant)
    for field, value in raw.items():
        state, _, job_type = _text(field).partition("|")
        if int(value) > 0:
            counts.setdefault(state, {})[job_type] = int(value)
    return counts


def rebuild_counts(client: redis.Redis, job_states: Mapping[tuple[str, str, str, str], int]) -> None:
    """Set the counts of what is now (each tenant's jobs by state and type, the running jobs by type and
    method) from the jobs' records, `{(tenant, state, type, method): jobs}`, replacing what Redis held: `amend
    reindex` after Redis was lost. The totals (submitted, finished, the histograms) are Prometheus counters
    and start again from zero, as a counter does after a restart. One transaction, so a scrape sees the old
    counts or the new ones; a job that changes state while `reindex` reads the records may be counted in its
    old state until the next reindex (run it with Redis just restored, as `amend reindex` is meant to be)."""
    tenants: dict[str, dict[Any, Any]] = defaultdict(lambda: defaultdict(int))
    running: dict[Any, Any] = defaultdict(int)
    for (tenant, state, job_type, method), jobs in job_states.items():
        tenants[tenant][f"{state}|{job_type}"] += jobs
        if state == "running":
            running[f"{job_type}|{method}"] += jobs
    stale = list(client.scan_iter(match=TENANT_STATES + "*", count=500))
    pipe = client.pipeline(transaction=True)
    pipe.delete(RUNNING, *stale)
    for tenant, fields in tenants.items():
        pipe.hset(TENANT_STATES + tenant, mapping=dict(fields))
    if running:
        pipe.hset(RUNNING, mapping=dict(running))
    pipe.execute()


def backend_of(error: BaseException) -> str | None:
    """"redis" or "storage" for an error that says one of them was unavailable, else None."""
    if isinstance(error, redis.RedisError):
        return "redis"
    return BACKENDS.get(error.code) if isinstance(error, AmendError) else None


class WorkerErrors:
    """A worker process's Redis and storage errors (a job attempt, a heartbeat, a progress event, a reaper
    sweep), counted into `WORKER_ERRORS`. A Redis error is only kept here at first (Redis is what failed);
    `flush`, called by the heartbeat every period and after each storage error, writes what is kept with one
    pipelined round trip and keeps it for the next time if Redis is still away."""

    def __init__(self) -> None:
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, client: redis.Redis, error: BaseException) -> None:
        backend = backend_of(error)
        if backend is None:
            return
        with self._lock:
            self._pending[backend] = self._pending.get(backend, 0) + 1
        if backend != "redis":
            self.flush(client)

    def flush(self, client: redis.Redis) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            pipe = client.pipeline(transaction=False)
            for backend, errors in pending.items():
                pipe.hincrby(WORKER_ERRORS, backend, errors)
            pipe.execute()
        except redis.RedisError:
            with self._lock:
                for backend, errors in pending.items():
                    self._pending[backend] = self._pending.get(backend, 0) + errors


worker_errors = WorkerErrors()  # this process's (a worker's); the API counts its own in `ApiMetrics`


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisCollector(Collector):
    """Job counters and histograms, running jobs, queue depths and worker heartbeats, read at scrape time."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("amend_redis_up", "1 when /metrics could read Redis")
        try:
            families = list(self._families())
        except redis.RedisError as error:
            log.warning("metrics could not read Redis", extra={"error": str(error)})
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterable[Any]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(JOBS)
        pipe.hgetall(RUNNING)
        pipe.hgetall(WORKER_ERRORS)
        for name in HISTOGRAMS:
            pipe.hgetall(_histogram_key(name))
        queues = all_queues()
        for queue in queues:
            pipe.llen(queue)
        jobs, running, worker_errors_seen, *rest = pipe.execute()
        hists, depths = rest[: len(HISTOGRAMS)], rest[len(HISTOGRAMS):]

        submitted = CounterMetricFamily("amend_jobs_submitted", "Jobs submitted", labels=["type", "method"])
        finished = CounterMetricFamily(
            "amend_jobs_finished", "Jobs that reached a final state", labels=["type", "method", "outcome"]
        )
        for field, value in sorted((_text(k), int(v)) for k, v in jobs.items()):
            kind, *labels = field.split("|")
            (submitted if kind == "submitted" else finished).add_metric(labels, value)
        yield submitted
        yield finished

        gauge = GaugeMetricFamily("amend_jobs_running", "Jobs running now", labels=["type", "method"])
        for field, value in sorted((_text(k), int(v)) for k, v in running.items()):
            gauge.add_metric(field.split("|"), max(0, value))
        yield gauge

        errors = CounterMetricFamily(
            "amend_worker_backend_errors", "Redis and object storage errors met by workers (job attempts, "
            "heartbeats, progress events, reaper sweeps)", labels=["backend"])
        met = {_text(k): int(v) for k, v in worker_errors_seen.items()}
        for backend in sorted(set(BACKENDS.values()) | set(met)):
            errors.add_metric([backend], met.get(backend, 0))
        yield errors

        for (name, buckets), raw in zip(HISTOGRAMS.items(), hists, strict=True):
            yield _histogram(name, buckets, raw)

        depth = GaugeMetricFamily("amend_queue_depth", "Messages waiting in each job queue", labels=["queue"])
        for queue, length in zip(queues, depths, strict=True):
            depth.add_metric([queue], int(length))
        yield depth

        workers = live_workers(self.client)
        alive = GaugeMetricFamily("amend_workers_alive", "Workers with a live heartbeat", labels=["device_class"])
        by_class: dict[str, int] = {"cpu": 0, "cuda": 0}
        seen = GaugeMetricFamily(
            "amend_worker_heartbeat_age_seconds", "Seconds since each live worker's last heartbeat",
            labels=["worker", "device"],
        )
        for worker in workers:
            device = worker.get("device") or {}
            by_class[str(device.get("class", "cpu"))] = by_class.get(str(device.get("class", "cpu")), 0) + 1
            age = max(0.0, time.time() - float(worker.get("seen_at", time.time())))
            seen.add_metric([str(worker.get("name", "")), str(device.get("device", ""))], age)
        for device_class, count in sorted(by_class.items()):
            alive.add_metric([device_class], count)
        yield alive
        yield seen


def _histogram(name: str, buckets: tuple[float, ...], raw: dict[Any, Any]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        f"amend_job_{name}_seconds",
        "Job run time, start to end" if name == "duration" else "Time from submission to a worker's start",
        labels=["type", "method"],
    )
    series: dict[tuple[str, str], dict[str, float]] = {}
    for field, value in raw.items():
        job_type, method, slot = _text(field).split("|")
        series.setdefault((job_type, method), {})[slot] = float(value)
    for labels, slots in sorted(series.items()):
        cumulative, points = 0.0, []
        for index, bound in enumerate(buckets):
            cumulative += slots.get(str(index), 0.0)
            points.append((_bound(bound), cumulative))
        points.append(("+Inf", cumulative + slots.get("inf", 0.0)))
        family.add_metric(list(labels), points, sum_value=slots.get("sum", 0.0))
    return family


def _bound(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


class ApiMetrics:
    """The API process's own registry: request latency by route template, Redis and storage errors, and the
    Redis collector."""

    def __init__(self, client: redis.Redis) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram(
            "amend_http_request_duration_seconds", "API request latency by route template",
            ["method", "route", "status"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.backend_errors = Counter(
            "amend_backend_errors", "Requests that failed because Redis or object storage was unavailable",
            ["backend"], registry=self.registry,
        )
        self.registry.register(RedisCollector(client))


class LatencyMiddleware:
    """Times every HTTP request and labels it with the route's template (`/v1/jobs/{job_id}`), never the raw
    path, so ids do not explode the label set. Unmatched paths are `unmatched`."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.latency.labels(scope["method"], route, str(status[0])).observe(
                time.perf_counter() - started
            )
