"""Webhooks: when a job ends (`succeeded`, `failed`, `cancelled`) the service POSTs a small JSON payload to the
job's `webhook_url` (or the tenant's default), signed the Standard Webhooks way, retried with backoff, and
each attempt is recorded in the job's events.

Design: the `lifecycle.on_change` listener (`enqueue`, in whichever process ended the job: a worker, or the API
for a cancel) only writes the delivery to Redis — a hash with the payload and a sorted set scored by when
it is due — so ending a job never waits on someone else's server. A `Sender` thread in each API process
claims due deliveries (ZREM: exactly one sender gets each), POSTs them, and reschedules failures
(`webhook_retry_base_seconds` × 2^attempt, up to `webhook_max_attempts`). Deliveries survive API restarts;
the API is always running, while a worker may be busy with a long job for an hour.

Targets: `https` only, or `http` to hosts in `AMEND_WEBHOOK_ALLOW_HTTP_HOSTS`; a host that resolves to a
private, loopback, link-local or otherwise reserved address is refused unless it is in that list or
`AMEND_WEBHOOK_ALLOW_PRIVATE` is true. The check runs at submission (literal addresses) and again, on the
resolved addresses, before every attempt. Redirects are not followed.

Signing (https://www.standardwebhooks.com): headers `webhook-id`, `webhook-timestamp` (unix seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`. Each tenant's secret is
derived from `AMEND_WEBHOOK_SECRET` (HMAC of the tenant name) and shown to the tenant at
`GET /v1/webhooks/secret` as `whsec_<base64 key>` (with no webhook secret set, from the audit key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from app.errors import Unprocessable
from app.jobs import lifecycle
from app.records import Records, now
from app.schemas.jobs import FINAL_STATES, JobRecord, JobState
from app.settings import Settings

log = logging.getLogger(__name__)

DUE = "amend:webhooks:due"  # sorted set: delivery id -> unix time it is due


def _delivery_key(delivery_id: str) -> str:
    return f"amend:webhook:{delivery_id}"


def tenant_secret(settings: Settings, tenant: str) -> bytes:
    master = (settings.webhook_secret.get_secret_value() or settings.audit_hmac_key.get_secret_value()).encode()
    return hmac.new(master, f"webhook:{tenant}".encode(), hashlib.sha256).digest()


def tenant_secret_text(settings: Settings, tenant: str) -> str:
    return "whsec_" + base64.b64encode(tenant_secret(settings, tenant)).decode()


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not ip.is_global or ip.is_multicast


def check_url(url: str | None, settings: Settings, resolve: bool = False) -> None:
    """Refuse a webhook target the operator does not allow (Unprocessable). With `resolve`, every address the
    host resolves to is checked too (before each attempt)."""
    if url is None:
        return
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    allowed_hosts = {h.lower() for h in settings.webhook_allow_http_hosts}
    if not host:
        raise Unprocessable("webhook_url needs a host", code="webhook_not_allowed")
    if parts.scheme != "https" and not (parts.scheme == "http" and host in allowed_hosts):
        raise Unprocessable("webhook_url must be https (http only to hosts the operator allows)",
                            code="webhook_not_allowed")
    if host in allowed_hosts or settings.webhook_allow_private:
        return
    try:
        addresses = [host] if _is_ip(host) else (
            [info[4][0] for info in socket.getaddrinfo(host, parts.port or 443)] if resolve else []
        )
    except OSError as error:
        raise Unprocessable(f"webhook host {host} does not resolve: {error}", code="webhook_not_allowed") from None
    if any(_blocked(str(address)) for address in addresses):
        raise Unprocessable(f"webhook host {host} is a private address", code="webhook_not_allowed")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def target_for(record: JobRecord, settings: Settings) -> str | None:
    return record.spec.get("webhook_url") or settings.webhook_default_urls.get(record.tenant)


def payload(record: JobRecord) -> dict[str, Any]:
    result = record.result.model_dump(mode="json", exclude={"report"}) if record.result else None
    return {
        "type": f"job.{record.state}",
        "timestamp": (record.finished_at or now()).isoformat(),
        "data": {"id": record.id, "type": record.type, "method": record.method, "state": record.state,
                 "error": record.error.model_dump() if record.error else None, "result": result},
    }


def enqueue(client: redis.Redis, settings: Settings, record: JobRecord, previous: JobState | None) -> None:
    """The `on_change` listener: a job that just ended with a webhook target gets one delivery queued."""
    if record.state not in FINAL_STATES or previous in FINAL_STATES:
        return
    url = target_for(record, settings)
    if not url:
        return
    delivery_id = "msg_" + secrets.token_hex(12)
    body = json.dumps(payload(record), separators=(",", ":"))
    pipe = client.pipeline()
    pipe.hset(_delivery_key(delivery_id), mapping={
        "url": url, "body": body, "job_id": record.id, "tenant": record.tenant, "attempt": 0})
    pipe.expire(_delivery_key(delivery_id), 7 * 24 * 3600)
    pipe.zadd(DUE, {delivery_id: time.time()})
    pipe.execute()


class Sender(threading.Thread):
    """Delivers due webhooks from this process; any number of senders may run (each delivery is claimed)."""

    def __init__(self, records: Records, settings: Settings, poll_seconds: float = 0.25) -> None:
        super().__init__(name="amend-webhooks", daemon=True)
        self.records, self.settings, self.poll = records, settings, poll_seconds
        self.stopped = threading.Event()
        self.http = httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.deliver_due()
            except redis.RedisError as error:
                log.warning("webhook sender cannot reach Redis", extra={"error": str(error)})
            except Exception:  # noqa: BLE001 - the sender thread must outlive any one delivery
                log.exception("webhook sender failed")
            self.stopped.wait(self.poll)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        self.http.close()

    def deliver_due(self) -> int:
        index = self.records.index
        due: Any = index.zrangebyscore(DUE, "-inf", time.time(), start=0, num=20)
        sent = 0
        for raw_id in due:
            delivery_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if not index.zrem(DUE, delivery_id):
                continue  # another sender took it
            fields: Any = index.hgetall(_delivery_key(delivery_id))
            if fields:
                self.attempt(delivery_id, {k.decode(): v.decode() for k, v in fields.items()})
                sent += 1
        return sent

    def attempt(self, delivery_id: str, delivery: dict[str, str]) -> None:
        attempt = int(delivery["attempt"]) + 1
        body = delivery["body"].encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "amend-webhooks/1",
            "webhook-id": delivery_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(tenant_secret(self.settings, delivery["tenant"]), delivery_id, timestamp, body),
        }
        try:
            check_url(delivery["url"], self.settings, resolve=True)
            response = self.http.post(delivery["url"], content=body, headers=headers)
            outcome, ok = f"HTTP {response.status_code}", 200 <= response.status_code < 300
        except Unprocessable as error:
            outcome, ok, attempt = f"refused: {error.message}", False, self.settings.webhook_max_attempts
        except httpx.HTTPError as error:
            outcome, ok = f"{type(error).__name__}", False
        index = self.records.index
        if ok:
            note = f"webhook {delivery_id} delivered (attempt {attempt}, {outcome})"
            index.delete(_delivery_key(delivery_id))
        elif attempt >= self.settings.webhook_max_attempts:
            note = f"webhook {delivery_id} failed for good (attempt {attempt}, {outcome})"
            index.delete(_delivery_key(delivery_id))
        else:
            delay = self.settings.webhook_retry_base_seconds * 2 ** (attempt - 1)
            note = f"webhook {delivery_id} attempt {attempt} failed ({outcome}); retry in {delay:g} s"
            index.hset(_delivery_key(delivery_id), "attempt", attempt)
            index.zadd(DUE, {delivery_id: time.time() + delay})
        log.info(note, extra={"job_id": delivery["job_id"], "tenant": delivery["tenant"]})
        lifecycle.note(self.records, delivery["job_id"], note)
