"""Polling that scales: ETag/304 on the job and the list, list filters, a cursor that stays stable while jobs
are added, and the event log as JSON and as server-sent events resuming from Last-Event-ID."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.app.test_api import upload


@pytest.fixture
def adapters(api, adapter_dir):
    return [upload(api, adapter_dir(name, seed=seed), name).json()["id"] for name, seed in (("one", 1), ("two", 2))]


def submit(api, adapters, method="task_arithmetic", only_first=False):
    chosen = adapters[:1] if only_first else adapters
    body = {"type": "merge", "adapters": [{"id": i} for i in chosen], "method": method, "output": {"rank": 2}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def test_the_list_answers_304_until_it_changes(api, adapters):
    submit(api, adapters)
    first = api.get("/v1/jobs")
    etag = first.headers["etag"]
    again = api.get("/v1/jobs", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert api.get("/v1/jobs", headers={"If-None-Match": f'"other", {etag}'}).status_code == 304
    submit(api, adapters)
    changed = api.get("/v1/jobs", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag and len(changed.json()["items"]) == 2
    job = changed.json()["items"][0]["id"]
    tag = api.get(f"/v1/jobs/{job}").headers["etag"]
    assert api.get(f"/v1/jobs/{job}", headers={"If-None-Match": tag}).status_code == 304
    api.post(f"/v1/jobs/{job}/cancel")
    assert api.get(f"/v1/jobs/{job}", headers={"If-None-Match": tag}).status_code == 200


def test_filters(api, adapters):
    ta = submit(api, adapters)
    cat = submit(api, adapters, method="cat")
    only_one = submit(api, adapters, only_first=True)
    api.post(f"/v1/jobs/{cat}/cancel")
    assert ids(api.get("/v1/jobs", params={"method": "cat"})) == [cat]
    assert ids(api.get("/v1/jobs", params={"state": "cancelled"})) == [cat]
    assert ids(api.get("/v1/jobs", params={"state": "queued", "method": "task_arithmetic"})) == [only_one, ta]
    assert ids(api.get("/v1/jobs", params={"type": "unlearn"})) == []
    assert ids(api.get("/v1/jobs", params={"adapter": adapters[1]})) == [cat, ta]
    created = {item["id"]: item["created_at"] for item in api.get("/v1/jobs").json()["items"]}
    middle = created[cat]
    assert ids(api.get("/v1/jobs", params={"created_after": middle})) == [only_one]
    assert ids(api.get("/v1/jobs", params={"created_before": middle})) == [ta]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert ids(api.get("/v1/jobs", params={"created_before": future, "created_after": created[ta]})) == [only_one, cat]
    assert ids(api.get("/v1/jobs", params={"schedule": "sc_0123456789abcdef01234567"})) == []  # none from it
    naive = api.get("/v1/jobs", params={"created_after": "2026-01-01T00:00:00"})
    assert naive.status_code == 422, naive.text
    assert api.get("/v1/jobs", params={"method": "Robert'); DROP"}).status_code == 422


def test_the_cursor_stays_stable_while_jobs_are_added(api, adapters):
    older = [submit(api, adapters) for _ in range(5)][::-1]  # newest first
    page = api.get("/v1/jobs", params={"limit": 2}).json()
    seen = [item["id"] for item in page["items"]]
    newer = [submit(api, adapters) for _ in range(3)]
    while page["next_cursor"]:
        page = api.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        seen += [item["id"] for item in page["items"]]
    assert seen == older  # no job repeated or skipped, and the new ones (on the first page now) not mixed in
    assert ids(api.get("/v1/jobs", params={"limit": 3})) == newer[::-1]


def test_the_event_log_as_json_and_as_a_resumable_stream(api, adapters):
    job = submit(api, adapters)
    api.post(f"/v1/jobs/{job}/cancel")
    log = api.get(f"/v1/jobs/{job}/events")
    assert log.status_code == 200 and log.headers["content-type"].startswith("application/json")
    body = log.json()
    assert body["state"] == "cancelled"
    assert [item["stage"] for item in body["items"]] == ["queued", "cancelled before it started"]
    first, last = (int(item["id"]) for item in body["items"])
    assert first < last
    assert [i["id"] for i in api.get(f"/v1/jobs/{job}/events", params={"after": str(first)}).json()["items"]] == [
        str(last)]

    def stream(**headers: str) -> list[tuple[str | None, str, dict]]:
        with api.stream("GET", f"/v1/jobs/{job}/events", headers={"Accept": "text/event-stream", **headers}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            text = r.read().decode()
        events = []
        for block in text.strip().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
        return events

    full = stream()
    assert [(i, e) for i, e, _ in full] == [(str(first), "event"), (str(last), "event"), (None, "progress"),
                                             (None, "end")]
    assert full[-1][2] == {"state": "cancelled"}
    resumed = stream(**{"Last-Event-ID": str(first)})
    assert [(i, e) for i, e, _ in resumed] == [(str(last), "event"), (None, "progress"), (None, "end")]


def test_the_polling_fast_path_answers_exactly_as_the_route(api, adapters, redis_client):
    job = submit(api, adapters)
    fast = api.get(f"/v1/jobs/{job}")
    routed = api.get(f"/v1/jobs/{job}", params={"via": "route"})  # a query string always takes the route
    assert fast.status_code == routed.status_code == 200
    assert fast.content == routed.content and fast.headers["etag"] == routed.headers["etag"]
    for header in ("content-type", "cache-control", "x-request-id"):
        assert header in fast.headers
    assert api.get(f"/v1/jobs/{job}", headers={"If-None-Match": fast.headers["etag"]}).status_code == 304
    other = api.get(f"/v1/jobs/{job}", headers={"Authorization": "Bearer nope"})
    assert other.status_code == 401 and other.json()["error"]["code"] == "unauthorized"
    # another tenant's job, and a job only in storage, fall through to the route
    redis_client.delete(f"amend:job:{job}")
    assert api.get(f"/v1/jobs/{job}").json()["id"] == job  # read back from storage by the route
    metrics = api.get("/metrics").text
    assert 'route="/v1/jobs/{job_id}"' in metrics and "unmatched" not in metrics


def test_the_list_body_is_the_page_schema(api, adapters):
    from app.schemas.common import Page
    from app.schemas.jobs import JobPublic

    for _ in range(3):
        submit(api, adapters)
    response = api.get("/v1/jobs", params={"limit": 2})
    page = Page[JobPublic].model_validate_json(response.content)
    assert response.content == page.model_dump_json().encode() and page.next_cursor


def test_the_list_etag_is_stale_after_any_change_and_a_304_reads_no_list(api, adapters, redis_client):
    from app.jobs import lifecycle

    records = api.app.state.records
    queued, running = submit(api, adapters), submit(api, adapters)
    built = []
    real_list_jobs = records.list_jobs
    records.list_jobs = lambda *args, **kwargs: built.append(1) or real_list_jobs(*args, **kwargs)

    def tag_after(change) -> str:
        """The list's tag, then `change`; the old tag must now get the full list, under a new tag."""
        etag = api.get("/v1/jobs").headers["etag"]
        count = len(built)
        assert api.get("/v1/jobs", headers={"If-None-Match": etag}).status_code == 304
        assert len(built) == count  # answered from the version alone: no list read
        change()
        fresh = api.get("/v1/jobs", headers={"If-None-Match": etag})
        assert fresh.status_code == 200 and fresh.headers["etag"] != etag, change
        return fresh.json()["items"]

    items = tag_after(lambda: lifecycle.start(records, running, max_attempts=3))
    assert {i["id"]: i["state"] for i in items}[running] == "running"
    items = tag_after(lambda: records.set_progress(running, 0.5, "module 5/10", "tenant-a"))  # progress only
    assert {i["id"]: i["stage"] for i in items}[running] == "module 5/10"
    tag_after(lambda: records.set_progress(running, 0.6, "module 6/10"))  # a caller that does not name the tenant
    tag_after(lambda: api.post(f"/v1/jobs/{queued}/cancel"))
    tag_after(lambda: lifecycle.finish(records, running, "failed"))
    tag_after(lambda: submit(api, adapters))
    tag_after(lambda: redis_client.delete(records.jobs_version_key("tenant-a")))  # a lost version: a new one
    items = tag_after(lambda: redis_client.flushdb())  # Redis lost: nothing indexed, never a 304 from before
    assert items == []


def test_each_query_has_its_own_list_etag(api, adapters):
    submit(api, adapters)
    queries = [{}, {"state": "queued"}, {"type": "merge"}, {"method": "task_arithmetic"}, {"limit": 1},
               {"limit": 2}, {"adapter": adapters[0]}, {"created_after": "2020-01-01T00:00:00Z"}]
    responses = [api.get("/v1/jobs", params=query) for query in queries]
    assert len({response.content for response in responses}) == 1  # the same body for every one of them
    tags = [response.headers["etag"] for response in responses]
    assert len(set(tags)) == len(queries)  # yet a tag of its own each
    for query, tag in zip(queries, tags, strict=True):
        assert api.get("/v1/jobs", params=query, headers={"If-None-Match": tag}).status_code == 304
        other = queries[(queries.index(query) + 1) % len(queries)]
        assert api.get("/v1/jobs", params=other, headers={"If-None-Match": tag}).status_code == 200
