"""The real stack for integration tests: redis-server, SeaweedFS S3 and a Celery worker subprocess, on
free loopback ports, started and stopped by this session (so the suite runs while `make run` is up)."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app import devstack
from app.main import create_app
from app.settings import DEV_S3_ACCESS_KEY, DEV_S3_SECRET_KEY, Settings
from tests.conftest import tenant_keys


class Stack:
    def __init__(self, root: Path, redis_url: str) -> None:
        self.root = root
        self.redis_url = redis_url
        self.s3: devstack.Service | None = None
        self.redis: devstack.Service | None = None
        self.s3_url = ""
        self.workers: list[devstack.Service] = []
        self.bucket = f"it-{uuid.uuid4().hex[:10]}"
        self.s3_port = devstack.free_port()

    @property
    def env(self) -> dict[str, str]:
        return {
            "REDIS_URL": self.redis_url,
            "AMEND_S3_ENDPOINT_URL": self.s3_url,
            "AMEND_S3_BUCKET": self.bucket,
            "AMEND_S3_ACCESS_KEY_ID": DEV_S3_ACCESS_KEY,
            "AMEND_S3_SECRET_ACCESS_KEY": DEV_S3_SECRET_KEY,
            "AMEND_ENVIRONMENT": "test",
            "AMEND_JOB_LEASE_SECONDS": "6",
            "AMEND_S3_MAX_ATTEMPTS": "2",
            "AMEND_S3_CONNECT_TIMEOUT": "2",
            "HF_HUB_OFFLINE": "1",
        }

    def start_redis(self) -> None:
        """Own redis-server (for tests that stop it); its port stays the same across restarts."""
        port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0]) if self.redis_url else devstack.free_port()
        self.redis, self.redis_url = devstack.start_redis(self.root / "redis", port=port)

    def stop_redis(self, wipe: bool = False) -> None:
        self.redis.stop()
        if wipe:
            shutil.rmtree(self.root / "redis", ignore_errors=True)

    def start_s3(self) -> None:
        self.s3, self.s3_url = devstack.start_seaweed(
            self.root / "s3", DEV_S3_ACCESS_KEY, DEV_S3_SECRET_KEY, port=self.s3_port,
            log_path=self.root / "seaweedfs.log",
        )

    def start_worker(
        self, extra_env: dict[str, str] | None = None, app: str = "workers.celery_app"
    ) -> devstack.Service:
        name = f"worker{len(self.workers)}"
        worker = devstack.start_worker(
            self.env | (extra_env or {}), log_path=self.root / f"{name}.log", name=name, app=app
        )
        self.workers.append(worker)
        return worker

    def settings(self, api_keys: str) -> Settings:
        return Settings(
            environment="test", redis_url=self.redis_url, s3_endpoint_url=self.s3_url, s3_bucket=self.bucket,
            api_keys=api_keys, s3_max_attempts=2, s3_connect_timeout=2,
        )

    @contextmanager
    def client(self) -> Iterator[TestClient]:
        """An in-process API on this stack, authenticated as tenant A (`.other_key` is tenant B's key)."""
        key_a, key_b, api_keys = tenant_keys()
        with TestClient(create_app(self.settings(api_keys))) as test_client:
            test_client.headers["Authorization"] = f"Bearer {key_a}"
            test_client.other_key = key_b  # type: ignore[attr-defined]
            yield test_client

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for service in (self.s3, self.redis):
            if service is not None:
                service.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    # database 1: unit tests enqueue into database 0, and this stack's worker must not consume their jobs
    stack = Stack(tmp_path_factory.mktemp("stack"), redis_url.rsplit("/", 1)[0] + "/1")
    stack.start_s3()
    stack.start_worker()
    yield stack
    stack.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[TestClient]:
    redis.Redis.from_url(stack.redis_url).flushdb()
    with stack.client() as test_client:
        yield test_client


FINAL = ("succeeded", "failed", "cancelled")


def wait_for_job(client: TestClient, job_id: str, timeout: float = 120.0, states=FINAL) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s: {job}")


def upload_dir(client: TestClient, directory: Path, name: str = "adapter") -> dict:
    response = client.post(
        "/v1/adapters",
        files={
            "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes()),
        },
        data={"name": name},
    )
    assert response.status_code == 201, response.text
    return response.json()

