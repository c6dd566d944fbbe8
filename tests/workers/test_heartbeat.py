"""Worker heartbeats in Redis: `GET /v1/stats` shows each live worker's device, and unlearning jobs go to the
GPU-only queue exactly while a GPU worker's heartbeat is live (real redis-server, moto S3)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.queue import GPU_WORKERS_KEY, WORKERS_KEY, route
from app.settings import Settings
from tests.conftest import tenant_keys
from workers.device import WorkerDevice, resolve
from workers.upkeep.heartbeat import Heartbeat


@pytest.fixture
def api(redis_url, redis_client, moto_s3):
    redis_client.delete(WORKERS_KEY, GPU_WORKERS_KEY)
    key_a, _, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        yield client


class FakeGpu(WorkerDevice):
    def free_memory(self) -> int:
        return 30 * 2**30


def test_stats_lists_live_workers_with_their_device_and_unlearning_follows_the_gpu(api, redis_client):
    celery = api.app.state.celery
    assert route(celery, "unlearn") == "amend.unlearn" and route(celery, "merge") == "amend.merge"
    cpu = Heartbeat(redis_client, "cpu-worker#1", resolve("cpu"), ["amend.merge", "amend.compress"], period=1)
    gpu_device = FakeGpu("auto", "cuda:0", "cuda", "NVIDIA A100-SXM4-80GB", 80 * 2**30, (8, 0))
    gpu = Heartbeat(redis_client, "gpu-worker#2", gpu_device, ["amend.merge", "amend.unlearn.gpu"], period=1)
    cpu.beat()
    assert route(celery, "unlearn") == "amend.unlearn"  # a CPU worker alone: the shared queue
    gpu.beat()
    assert route(celery, "unlearn") == "amend.unlearn.gpu"
    assert route(celery, "compress") == "amend.compress"
    stats = api.get("/v1/stats")
    assert stats.status_code == 200, stats.text
    workers = {w["name"]: w for w in stats.json()["workers"]}
    assert workers.keys() == {"cpu-worker#1", "gpu-worker#2"}
    assert workers["gpu-worker#2"]["device"] == {
        "spec": "auto", "device": "cuda:0", "class": "cuda", "name": "NVIDIA A100-SXM4-80GB",
        "total_memory": 80 * 2**30, "free_memory": 30 * 2**30}
    assert workers["cpu-worker#1"]["device"]["class"] == "cpu"
    assert set(stats.json()["queues"]) == {"amend.merge", "amend.unlearn", "amend.compress", "amend.unlearn.gpu"}
    gpu.stop()  # a worker that shuts down removes itself at once
    assert route(celery, "unlearn") == "amend.unlearn"
    assert [w["name"] for w in api.get("/v1/stats").json()["workers"]] == ["cpu-worker#1"]


def test_a_silent_worker_expires_after_three_periods(api, redis_client):
    beat = Heartbeat(redis_client, "gpu#3", FakeGpu("cuda", "cuda:0", "cuda", "T4", 16 * 2**30), [], period=1)
    beat.beat()
    assert route(api.app.state.celery, "unlearn") == "amend.unlearn.gpu"
    time.sleep(3.2)
    assert route(api.app.state.celery, "unlearn") == "amend.unlearn"
    assert api.get("/v1/stats").json()["workers"] == []


def test_stats_needs_a_key(api):
    assert api.get("/v1/stats", headers={"Authorization": ""}).status_code == 401
