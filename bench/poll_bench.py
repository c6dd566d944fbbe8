"""Polling cost: `GET /v1/jobs/{id}` (200 and 304), the job list (200 and 304) and the event log against a
hello-world endpoint on the same uvicorn process, in the same run, with 1,000 jobs stored.

Starts its own redis-server and SeaweedFS (devstack.start_backends), writes the jobs straight through the
records, runs one uvicorn process (`bench.poll_bench:app`: create_app plus `GET /hello`), then a bounded
closed-loop load (`--concurrency` requests in flight, `--seconds` per endpoint) from an asyncio httpx client
on 127.0.0.1, and last an open-loop run at `--rate` job polls per second for the p99 target. Prints
requests/s, p50/p99 and each endpoint's ratio to hello-world. Client and server share this machine's cores,
so absolute rates are lower than with a separate load generator; the ratios are the measure.

    .venv/bin/python -m bench.poll_bench [--jobs 1000] [--seconds 5] [--concurrency 32] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app import devstack

KEY = "poll-bench-key"


def app():  # type: ignore[no-untyped-def]
    """The API as `make run` serves it, plus FastAPI's hello-world (the ceiling) on the same process."""
    from app.main import create_app

    api = create_app()

    @api.get("/hello", include_in_schema=False)
    async def hello() -> dict[str, str]:  # FastAPI's own hello-world
        return {"Hello": "World"}

    return api


def seed_jobs(env: dict[str, str], count: int) -> list[str]:
    from app.jobs import lifecycle
    from app.records import Records, new_id, now
    from app.schemas.jobs import JobRecord
    from app.settings import Settings

    settings = Settings(redis_url=env["REDIS_URL"], s3_endpoint_url=env["AMEND_S3_ENDPOINT_URL"])
    records = Records.connect(settings)
    records.storage.ensure_bucket()
    ids = []
    spec = {"type": "merge", "adapters": [{"id": f"ad_{i:024x}", "weight": 1.0} for i in range(4)],
            "method": "ctm", "params": {"rule": "ties", "density": 0.5}, "output": {"name": "m", "rank": 8}}
    for i in range(count):
        record = JobRecord(id=new_id("jb"), tenant="bench", type="merge", method="ctm", state="queued",
                           progress=0.0, stage="queued", created_at=now(), spec=spec)
        lifecycle.create(records, record)
        if i % 3 == 0:
            lifecycle.start(records, record.id, max_attempts=3)
            records.set_progress(record.id, 0.4, "merging modules 12/30")
        ids.append(record.id)
    return ids


async def closed_loop(client: httpx.AsyncClient, url: str, headers: dict[str, str], seconds: float,
                      concurrency: int, expect: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def one_user() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            response = await client.get(url, headers=headers)
            latencies.append(time.perf_counter() - started)
            if response.status_code != expect:
                raise RuntimeError(f"{url}: {response.status_code} (expected {expect}): {response.text[:200]}")

    began = time.perf_counter()
    await asyncio.gather(*(one_user() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - began), latencies


async def open_loop(client: httpx.AsyncClient, url: str, headers: dict[str, str], rate: float,
                    seconds: float) -> tuple[float, list[float]]:
    """`rate` requests per second on a fixed schedule, however slowly they come back (no coordinated omission:
    latency counts from the scheduled start)."""
    latencies: list[float] = []
    began = time.perf_counter()
    tasks = []

    async def one(scheduled: float) -> None:
        await client.get(url, headers=headers)
        latencies.append(time.perf_counter() - scheduled)

    total = int(rate * seconds)
    for i in range(total):
        scheduled = began + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    return total / (time.perf_counter() - began), latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(base: str, ids: list[str], seconds: float, concurrency: int, rate: float, server_pid: int) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        job = ids[len(ids) // 2]
        job_etag = (await client.get(f"/v1/jobs/{job}", headers=auth)).headers["etag"]
        list_etag = (await client.get("/v1/jobs?limit=20", headers=auth)).headers.get("etag", "")
        cases = [
            ("hello-world GET /hello", "/hello", {}, 200),
            ("GET /v1/jobs/{id}", f"/v1/jobs/{job}", auth, 200),
            ("GET /v1/jobs/{id} If-None-Match -> 304", f"/v1/jobs/{job}", auth | {"If-None-Match": job_etag}, 304),
            ("GET /v1/jobs?limit=20", "/v1/jobs?limit=20", auth, 200),
            ("GET /v1/jobs?limit=20 If-None-Match -> 304", "/v1/jobs?limit=20",
             auth | {"If-None-Match": list_etag}, 304),
            ("GET /v1/jobs/{id}/events (JSON)", f"/v1/jobs/{job}/events", auth, 200),
            ("GET /healthz", "/healthz", {}, 200),
        ]
        for _, url, headers, expect in cases:  # warm up every path
            await closed_loop(client, url, headers, 0.5, concurrency, expect)
        # Each endpoint runs right after its own hello-world run, so load from elsewhere on the machine hits both
        # sides of a ratio alike. Besides requests/s, the server's own CPU time per request (from /proc) is
        # printed: on a shared, busy machine it is the steadier measure of what a request costs; its ratio is
        # the share of hello-world's rate the endpoint would reach on a core of its own.
        print(f"{'endpoint':42} {'req/s':>6} {'hello/s':>7} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'cpu us/req':>10} {'cpu ratio':>9}")
        hello_url, hello_headers = cases[0][1], cases[0][2]

        async def measured(url: str, headers: dict[str, str], expect: int) -> tuple[float, list[float], float]:
            cpu = cpu_seconds(server_pid)
            rps, latencies = await closed_loop(client, url, headers, seconds, concurrency, expect)
            return rps, latencies, (cpu_seconds(server_pid) - cpu) / max(1, len(latencies))

        for name, url, headers, expect in cases[1:]:
            ceiling, _, hello_cpu = await measured(hello_url, hello_headers, 200)
            rps, latencies, cpu = await measured(url, headers, expect)
            p50, p99 = 1000 * statistics.median(latencies), 1000 * quantile(latencies, 0.99)
            print(f"{name:42} {rps:6.0f} {ceiling:7.0f} {rps / ceiling:6.0%} {p50:7.1f} {p99:7.1f} "
                  f"{1e6 * cpu:10.0f} {hello_cpu / cpu if cpu else float('nan'):9.0%}")
        not_modified = auth | {"If-None-Match": job_etag}
        for name, headers in (("GET /v1/jobs/{id}", auth), ("GET /v1/jobs/{id} 304", not_modified)):
            achieved, latencies = await open_loop(client, f"/v1/jobs/{job}", headers, rate, seconds)
            print(f"open loop {name} at {rate:.0f}/s: achieved {achieved:.0f}/s, "
                  f"p50 {1000 * statistics.median(latencies):.1f} ms, p99 {1000 * quantile(latencies, 0.99):.1f} ms "
                  f"(target p99 < 50 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="amend-poll-bench-"))
    services: list[devstack.Service] = []
    try:
        env = devstack.start_backends(root, services)
        started = time.perf_counter()
        ids = seed_jobs(env, args.jobs)
        print(f"{args.jobs} jobs stored in {time.perf_counter() - started:.1f} s")
        port = devstack.free_port()
        api_env = os.environ | env | {"AMEND_API_KEYS": f"{KEY}:bench", "AMEND_LOG_LEVEL": "WARNING"}
        api = devstack.Service(
            "api", [sys.executable, "-m", "uvicorn", "bench.poll_bench:app", "--factory", "--host", "127.0.0.1",
                    "--port", str(port), "--log-level", "warning", "--no-access-log"],
            env=api_env, log_path=root / "api.log",
        ).start()
        services.append(api)
        devstack._ready(api, lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
                        "API", 60)
        asyncio.run(run(f"http://127.0.0.1:{port}", ids, args.seconds, args.concurrency, args.rate, api.pid))
    except Exception:
        log = root / "api.log"
        print(log.read_text()[-3000:] if log.exists() else "no API log")
        raise
    finally:
        for service in reversed(services):
            service.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
