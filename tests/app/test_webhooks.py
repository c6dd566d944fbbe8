"""Webhooks against a receiver on loopback: Standard Webhooks signatures verified independently, a failing
receiver retried with backoff, every attempt in the job's events, and targets the operator does not allow
refused at submission."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.app.test_api import upload
from tests.conftest import tenant_keys


class Receiver:
    """An HTTP server on 127.0.0.1 answering with the given statuses in turn (then 200), keeping each request."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses, self.requests = list(statuses), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((dict(self.headers.items()), body, time.monotonic()))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= count, f"{len(self.requests)} deliveries, expected {count}"


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, written from the spec (not from the sender's code)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body.decode()}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [part.split(",", 1)[1] for part in headers["webhook-signature"].split() if part.startswith("v1,")]
    return any(hmac.compare_digest(expected, signature) for signature in given)


@pytest.fixture
def api(redis_url, redis_client, moto_s3):
    key_a, _, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys,
                        webhook_allow_http_hosts="127.0.0.1", webhook_retry_base_seconds=0.2,
                        webhook_max_attempts=4)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        yield client


@pytest.fixture
def spec(api, adapter_dir):
    adapter = upload(api, adapter_dir("one", seed=1), "one").json()["id"]
    return {"type": "merge", "adapters": [{"id": adapter}], "method": "cat"}


def test_a_failing_receiver_is_retried_and_every_attempt_is_an_event(api, spec):
    receiver = Receiver([500, 503])
    job = api.post("/v1/jobs", json=spec | {"webhook_url": receiver.url}).json()["id"]
    assert api.post(f"/v1/jobs/{job}/cancel").status_code == 200
    receiver.wait_for(3)
    secret = api.get("/v1/webhooks/secret").json()["secret"]
    assert secret.startswith("whsec_")
    ids = set()
    for headers, body, _ in receiver.requests:
        assert verify(secret, headers, body)
        assert not verify(secret, headers, body.replace(b"cancelled", b"succeeded"))  # tampering is caught
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        ids.add(headers["webhook-id"])
        sent = json.loads(body)
        assert sent["type"] == "job.cancelled" and sent["data"]["id"] == job and sent["data"]["state"] == "cancelled"
    assert len(ids) == 1  # one message, retried under the same id
    gaps = [b[2] - a[2] for a, b in zip(receiver.requests, receiver.requests[1:], strict=False)]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.35, gaps  # backoff 0.2 s, then 0.4 s
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stages = [item["stage"] for item in api.get(f"/v1/jobs/{job}/events").json()["items"]]
        if any("delivered" in stage for stage in stages):
            break
        time.sleep(0.05)
    webhook = [stage for stage in stages if stage.startswith("webhook")]
    assert len(webhook) == 3, stages
    assert "attempt 1 failed (HTTP 500)" in webhook[0] and "attempt 2 failed (HTTP 503)" in webhook[1]
    assert "delivered (attempt 3, HTTP 200)" in webhook[2]
    job_now = api.get(f"/v1/jobs/{job}").json()
    assert job_now["state"] == "cancelled" and job_now["stage"] == "cancelled before it started"


@pytest.mark.parametrize("url", [
    "http://example.com/hook",  # plain http to a host not allowed
    "https://10.1.2.3/hook",  # a private address
    "https://[::1]/hook",  # loopback (IPv6)
    "https://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
    "ftp://example.com/",
])
def test_targets_the_operator_does_not_allow_are_refused(api, spec, url):
    response = api.post("/v1/jobs", json=spec | {"webhook_url": url})
    assert response.status_code == 422, response.text
    assert api.get("/v1/jobs").json()["items"] == []


def test_a_tenant_default_url_is_used_when_the_job_names_none(redis_url, redis_client, moto_s3, adapter_dir):
    receiver = Receiver([])
    key_a, _, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys,
                        webhook_allow_http_hosts="127.0.0.1", webhook_default_urls=f"tenant-a={receiver.url}")
    with TestClient(create_app(settings)) as api:
        api.headers["Authorization"] = f"Bearer {key_a}"
        adapter = upload(api, adapter_dir("one", seed=1), "one").json()["id"]
        job = api.post("/v1/jobs", json={"type": "merge", "adapters": [{"id": adapter}], "method": "cat"}).json()
        api.post(f"/v1/jobs/{job['id']}/cancel")
        receiver.wait_for(1)
        assert json.loads(receiver.requests[0][1])["data"]["id"] == job["id"]
