"""A stack of its own for tests that break things: its own redis-server and SeaweedFS (which these tests
stop and restart), and workers running tests/reliability/worker_app.py."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.integration.conftest import Stack

WORKER_APP = "tests.reliability.worker_app"


@pytest.fixture
def rstack(tmp_path) -> Iterator[Stack]:
    stack = Stack(tmp_path, "")
    stack.start_redis()
    stack.start_s3()
    yield stack
    stack.stop()


@pytest.fixture
def rclient(rstack: Stack) -> Iterator[TestClient]:
    with rstack.client() as client:
        yield client


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
