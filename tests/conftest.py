"""Shared fixtures: a real redis-server for the session, moto S3 for unit tests, and tiny PEFT adapters."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from app import devstack  # noqa: E402
from app.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.Service]:
    service, url = devstack.start_redis(tmp_path_factory.mktemp("redis"))
    service.env["url"] = url
    yield service
    service.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: devstack.Service) -> str:
    return redis_server.env["url"]


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def tenant_keys() -> tuple[str, str, str]:
    """Two tenants' API keys and the settings string that configures them."""
    key_a, key_b = f"key-a-{uuid.uuid4().hex}", f"key-b-{uuid.uuid4().hex}"
    return key_a, key_b, f"{key_a}:tenant-a,{key_b}:tenant-b"


@pytest.fixture
def api(redis_url: str, redis_client: redis.Redis, moto_s3: None) -> Iterator[object]:
    """The whole API in-process (real redis-server, moto S3), signed in as tenant A."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    key_a, _, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        yield client


@pytest.fixture
def unit_settings(redis_url: str, redis_client: redis.Redis) -> Settings:
    """Settings for unit tests: the real test redis-server and moto's in-process S3 (see `moto_s3`)."""
    _, _, api_keys = tenant_keys()
    return Settings(
        environment="test",
        redis_url=redis_url,
        s3_endpoint_url=None,
        s3_bucket=f"unit-{uuid.uuid4().hex[:12]}",
        api_keys=api_keys,
    )


@pytest.fixture
def moto_s3() -> Iterator[None]:
    from moto import mock_aws

    with mock_aws():
        yield


@pytest.fixture
def adapter_dir(tmp_path: Path):
    """A factory of tiny real PEFT LoRA adapters saved with save_pretrained."""
    from tests.factories import make_adapter

    def build(name: str = "a", **kwargs):
        return make_adapter(tmp_path / name, **kwargs)

    return build
