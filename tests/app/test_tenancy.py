"""Tenant isolation, checked against the app's own OpenAPI spec so that new routes are covered automatically.

For every route with a record id in its path, tenant A creates the record and tenant B (with every scope)
calls the route: the answer is 404, the same as for an id that never existed, and nothing of A's changes.
A route whose id has no known way to be created fails the test loudly: add a creator to CREATORS.
Every route but health and the docs answers 401 without a key.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app import audit
from app.main import create_app
from app.schemas.jobs import ID_PATTERN, JobResult
from app.settings import Settings
from app.storage import keys
from tests.factories import tiny_model_tar

# /metrics: no tenant key (its own token, if any); the status page and its assets hold no data
PUBLIC_PATHS = {"/healthz", "/readyz", "/metrics", "/", "/ui/app.js", "/ui/style.css"}
DOCS_PATHS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
WEIGHTS = "adapter_model.safetensors"
# path parameters that are not record ids: a value per route that A's records really have
OTHER_PARAMS: dict[tuple[str, str], str] = {
    ("/v1/adapters/{adapter_id}/files/{filename}", "filename"): "adapter_config.json",
    ("/v1/models/{model_id}/files/{filename}", "filename"): "config.json",
    ("/v1/adapters/{adapter_id}/versions/{version}/promote", "version"): "999983",  # (not a substring of ids)
    ("/v1/models/{model_id}/versions/{version}/promote", "version"): "999983",
}


def _is_record_id(name: str, schema: dict) -> bool:
    return name.endswith("_id") or name == "id" or schema.get("pattern") == ID_PATTERN


# -- tenant A's records: one creator per kind of record id -------------------------------------------


def _upload_adapter(client: TestClient, ctx: SimpleNamespace, headers: dict | None = None) -> list[str]:
    directory = ctx.adapter_dir("tenancy-adapter")
    response = client.post(
        "/v1/adapters",
        files={
            "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes(), "application/json"),
            "weights": (WEIGHTS, (directory / WEIGHTS).read_bytes()),
        },
        data={"name": "a's adapter"},
        headers=headers or {},
    )
    assert response.status_code == 201, response.text
    return [response.json()["id"]]


def _upload_model(client: TestClient, ctx: SimpleNamespace) -> list[str]:
    response = client.post("/v1/models", files={"archive": ("model.tar.gz", tiny_model_tar())}, data={"name": "m"})
    assert response.status_code == 201, response.text
    return [response.json()["id"]]


def _upload_dataset(client: TestClient, ctx: SimpleNamespace) -> list[str]:
    rows = b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n" for i in range(3))
    response = client.post("/v1/datasets", files={"file": ("rows.jsonl", rows)}, data={"name": "d"})
    assert response.status_code == 201, response.text
    return [response.json()["id"]]


def _finish_with_result(client: TestClient, job_id: str) -> None:
    """Give A's job a stored report and signed audit record, so its report/audit/events routes answer A."""
    records = client.app.state.records
    tenant = records.get_job(job_id).tenant
    report_key, audit_key = keys.job(tenant, job_id, "report.json"), keys.job(tenant, job_id, "audit.json")
    records.storage.put_json(report_key, {"job_id": job_id, "secret_of_a": True})
    records.storage.put_json(audit_key, audit.sign({"job_id": job_id}, client.app.state.settings.audit_hmac_key
                                                   .get_secret_value()))

    def change(record) -> bool:
        record.state, record.progress, record.stage = "succeeded", 1.0, "done"
        record.result = JobResult(report_key=report_key, audit_key=audit_key, report={"ok": True})
        return True

    records.mutate_job(job_id, change)


def _create_jobs(client: TestClient, ctx: SimpleNamespace) -> list[str]:
    """A merge job and, when the API takes them, an unlearning job; each finished with a report."""
    adapter_id = ctx.ids("adapter_id")[0]
    merge = {"type": "merge", "adapters": [{"id": adapter_id, "weight": 1.0}], "method": "task_arithmetic",
             "params": {}, "output": {"name": "m", "rank": 4}}
    response = client.post("/v1/jobs", json=merge)
    assert response.status_code == 202, response.text
    ids = [response.json()["id"]]
    if "/v1/models" in ctx.paths and "/v1/datasets" in ctx.paths:
        unlearn = {"type": "unlearn", "model": ctx.ids("model_id")[0],
                   "forget": {"dataset": ctx.ids("dataset_id")[0], "rows": None},
                   "retain": ctx.ids("dataset_id")[0], "method": "grad_diff", "params": {"steps": 2},
                   "output": "adapter"}
        response = client.post("/v1/jobs", json=unlearn)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    compress = {"type": "compress", "adapter": adapter_id, "method": "rank_reduce", "output": {"rank": 2}}
    response = client.post("/v1/jobs", json=compress)
    assert response.status_code == 202, response.text
    ids.append(response.json()["id"])
    for job_id in ids:
        _finish_with_result(client, job_id)
    # and one job left queued, so routes that act on live jobs (cancel) meet one
    response = client.post("/v1/jobs", json=merge)
    assert response.status_code == 202, response.text
    return [*ids, response.json()["id"]]


def _create_requests(client: TestClient, ctx: SimpleNamespace) -> list[str]:
    """A deletion request left pending (so cancel meets one it could act on)."""
    body = {"target": {"model": ctx.ids("model_id")[0]}, "dataset": ctx.ids("dataset_id")[0], "rows": [0, 2]}
    response = client.post("/v1/unlearning-requests", json=body)
    assert response.status_code == 201, response.text
    return [response.json()["id"]]


def _create_schedules(client: TestClient, ctx: SimpleNamespace) -> list[str]:
    body = {"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin",
            "job": {"type": "unlearn_pending", "target": {"model": ctx.ids("model_id")[0]}, "method": "grad_ascent"}}
    response = client.post("/v1/schedules", json=body)
    assert response.status_code == 201, response.text
    return [response.json()["id"]]


def _create_uploads(client: TestClient, ctx: SimpleNamespace) -> list[str]:
    """A presigned upload left open (so complete and delete meet one they could act on)."""
    files = [{"name": name, "size": 100, "sha256": "0" * 64}
             for name in ("adapter_config.json", "adapter_model.safetensors")]
    response = client.post("/v1/uploads", json={"kind": "adapter", "files": files})
    assert response.status_code == 201, response.text
    return [response.json()["id"]]


# param name -> (id prefix, creator); order matters: jobs need adapters, models and datasets first
CREATORS: dict[str, tuple[str, Callable[[TestClient, SimpleNamespace], list[str]]]] = {
    "adapter_id": ("ad", _upload_adapter),
    "model_id": ("md", _upload_model),
    "dataset_id": ("ds", _upload_dataset),
    "job_id": ("jb", _create_jobs),
    "request_id": ("rq", _create_requests),
    "schedule_id": ("sc", _create_schedules),
    "upload_id": ("up", _create_uploads),
}


# -- the spec walk ----------------------------------------------------------------------------------


@pytest.fixture
def tenants(redis_url, redis_client, moto_s3, adapter_dir):
    key_a, key_b, key_b_ro = (f"key-{name}-{uuid.uuid4().hex}" for name in ("a", "b", "b-ro"))
    settings = Settings(
        environment="test",
        redis_url=redis_url,
        s3_bucket=f"tenancy-{uuid.uuid4().hex[:12]}",
        api_keys=f"{key_a}:tenant-a,{key_b}:tenant-b:read+write+admin,{key_b_ro}:tenant-b:read",
        max_upload_bytes=4 * 2**20,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield SimpleNamespace(client=client, a={"Authorization": f"Bearer {key_a}"},
                              b={"Authorization": f"Bearer {key_b}"}, b_ro={"Authorization": f"Bearer {key_b_ro}"},
                              adapter_dir=adapter_dir)


def _operations(client: TestClient) -> list[tuple[str, str, dict]]:
    spec = client.app.openapi()
    return [
        (path, method.upper(), operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]


def _path_params(operation: dict) -> list[tuple[str, dict]]:
    return [(p["name"], p.get("schema", {})) for p in operation.get("parameters", []) if p["in"] == "path"]


def _snapshot(client: TestClient) -> dict:
    """Every object in storage and every key in Redis, with its contents."""
    records = client.app.state.records
    objects = {key: records.storage.get_bytes(key) for key in records.storage.list_keys("")}
    index = records.index
    state: dict = {}
    for key in sorted(index.scan_iter(match="*", count=500)):
        kind = index.type(key).decode()
        if kind == "string":
            state[key] = index.get(key)
        elif kind == "set":
            state[key] = sorted(index.smembers(key))
        elif kind == "zset":
            state[key] = index.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            state[key] = index.lrange(key, 0, -1)
        elif kind == "hash":
            state[key] = sorted(index.hgetall(key).items())
        else:
            state[key] = kind
    return {"objects": objects, "index": state}


def _call(client: TestClient, method: str, url: str, headers: dict, operation: dict):
    body = {"json": {}} if "requestBody" in operation and method != "GET" else {}
    return client.request(method, url, headers=headers, **body)


def _fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{([^}]+)\}", lambda m: values[m.group(1)], path)


def test_every_record_route_hides_other_tenants_records(tenants):
    client, a, b = tenants.client, tenants.a, tenants.b
    client.headers.update(a)
    operations = _operations(client)
    with_ids = [(path, method, op) for path, method, op in operations
                if any(_is_record_id(name, schema) for name, schema in _path_params(op))]
    assert with_ids, "the spec has no routes with record ids: the walk is broken"

    # fail loudly for any id without a creator, before creating anything
    unknown = sorted({f"{method} {path}: {name}" for path, method, op in with_ids
                      for name, schema in _path_params(op)
                      if (_is_record_id(name, schema) and name not in CREATORS)
                      or (not _is_record_id(name, schema) and (path, name) not in OTHER_PARAMS)})
    assert not unknown, (
        f"no known way to create the record behind {unknown}; add a creator to CREATORS (or a value to "
        "OTHER_PARAMS) in tests/app/test_tenancy.py so this route's tenant isolation is tested"
    )

    created: dict[str, list[str]] = {}
    ctx = SimpleNamespace(adapter_dir=tenants.adapter_dir, paths=client.app.openapi()["paths"],
                          ids=lambda name: created[name])
    for name, (_, create) in CREATORS.items():
        created[name] = create(client, ctx)

    def combos(path: str, op: dict, ids: dict[str, list[str]]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = [{}]
        for name, _ in _path_params(op):
            choices = ids[name] if name in ids else [OTHER_PARAMS[(path, name)]]
            out = [combo | {name: choice} for combo in out for choice in choices]
        return out

    def never_created(name: str) -> str:
        return f"{CREATORS[name][0]}_{'0' * 14}{uuid.uuid4().hex[:10]}"

    before = _snapshot(client)
    checked = []
    # B with every scope, and B with a read-only key (the record's 404 must come before any 403)
    for path, method, op in with_ids:
        for values, key in ((v, k) for v in combos(path, op, created) for k in (b, tenants.b_ro)):
            url = _fill(path, values)
            response = _call(client, method, url, key, op)
            # a body from a read-only key is refused before any lookup (app.limits.KeyBeforeBody): 403 for every
            # id alike, so it tells nothing either; the ghost comparison below checks that
            expected = (403, "forbidden") if key is tenants.b_ro and "requestBody" in op else (404, "not_found")
            assert response.status_code == expected[0], f"tenant B got {response.status_code} for {method} {url}"
            assert response.json()["error"]["code"] == expected[1], response.text
            # exactly what B sees for an id that never existed: nothing tells "exists elsewhere" apart
            ghost_values = {n: (never_created(n) if n in CREATORS else v) for n, v in values.items()}
            ghost = _call(client, method, _fill(path, ghost_values), key, op)
            assert ghost.status_code == expected[0]
            assert _without_ids(response.text, values) == _without_ids(ghost.text, ghost_values), (method, url)
            checked.append(f"{method} {path}")
    assert _snapshot(client) == before, "tenant B's calls changed tenant A's data"

    # positive control: A reaches every readable route with the same ids (so B's 404 was about tenancy);
    # the queued job is left out: it has no report yet, and a live job's event stream does not end
    finished = created | {"job_id": created["job_id"][:-1]}
    for path, method, op in with_ids:
        if method != "GET":
            continue
        for values in combos(path, op, finished):
            url = _fill(path, values)
            response = _call(client, method, url, a, op)
            assert response.status_code == 200, f"tenant A got {response.status_code} for {method} {url}"
    assert {f"{m} {p}" for p, m, _ in with_ids} == set(checked)


def _without_ids(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace(value, "{" + name + "}")
    return text


def test_lists_never_show_other_tenants_records(tenants):
    client = tenants.client
    client.headers.update(tenants.a)
    ctx = SimpleNamespace(adapter_dir=tenants.adapter_dir, paths=client.app.openapi()["paths"], ids=None)
    created: dict[str, list[str]] = {}
    ctx.ids = lambda name: created[name]
    for name, (_, create) in CREATORS.items():
        created[name] = create(client, ctx)
    all_ids = [i for ids in created.values() for i in ids]
    lists = [(path, op) for path, method, op in _operations(client)
             if method == "GET" and not _path_params(op) and path not in PUBLIC_PATHS]
    assert lists
    for path, _op in lists:
        mine = client.get(path, headers=tenants.a)
        theirs = client.get(path, headers=tenants.b)
        assert mine.status_code == 200 and theirs.status_code == 200, (path, theirs.text)
        if "etag" in mine.headers:  # A's tag never answers B with a 304 (B's list is another list)
            assert client.get(path, headers=tenants.b | {"If-None-Match": mine.headers["etag"]}).status_code == 200
        if path == "/v1/webhooks/secret":  # each tenant signs with its own key
            assert mine.json()["secret"] != theirs.json()["secret"]
            continue
        if path == "/v1/stats":  # counts, not records: B's show none of A's jobs
            assert not theirs.json().get("jobs") and mine.json().get("jobs", True), (mine.text, theirs.text)
            continue
        assert any(i in mine.text for i in all_ids), f"A's own list {path} shows none of A's records"
        assert theirs.json()["items"] == [], f"B sees {theirs.text} at {path}"
    scraped = client.get("/metrics", headers={"Authorization": ""}).text  # no key: holds no tenant's ids
    assert "amend_jobs_submitted_total" in scraped
    assert not any(i in scraped for i in all_ids) and "tenant-a" not in scraped


def test_other_tenants_records_cannot_be_job_inputs(tenants):
    client = tenants.client
    client.headers.update(tenants.a)
    created: dict[str, list[str]] = {}
    ctx = SimpleNamespace(adapter_dir=tenants.adapter_dir, paths=client.app.openapi()["paths"],
                          ids=lambda name: created[name])
    for name in ("adapter_id", "model_id", "dataset_id"):
        created[name] = CREATORS[name][1](client, ctx)
    adapter, model, dataset = created["adapter_id"][0], created["model_id"][0], created["dataset_id"][0]
    before = _snapshot(client)
    merge = {"type": "merge", "adapters": [{"id": adapter, "weight": 1.0}], "method": "cat", "params": {}}
    pinned = {"type": "merge", "adapters": [{"id": adapter, "version": 1}], "method": "cat", "params": {}}
    for body in (merge, pinned):  # a version pin reads nothing of A's either
        response = client.post("/v1/jobs", json=body, headers=tenants.b)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", response.text
    unlearn = {"type": "unlearn", "model": model, "forget": {"dataset": dataset, "rows": None}, "retain": dataset,
               "method": "grad_diff", "params": {"steps": 2}, "output": "adapter", "adapter": adapter}
    for change in ({}, {"adapter": None}):
        response = client.post("/v1/jobs", json=unlearn | change, headers=tenants.b)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", response.text
    other_model = model[:-1] + ("1" if model.endswith("0") else "0")  # never the real id
    for compress in ({"type": "compress", "adapter": adapter, "method": "cast"},
                     {"type": "compress", "adapter": adapter, "adapter_version": 1, "method": "cast"},
                     {"type": "compress", "method": "extract", "base_model": model, "model": other_model}):
        response = client.post("/v1/jobs", json=compress, headers=tenants.b)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", response.text
    # a pinned version of A's adapter or model is A's too
    for url in (f"/v1/adapters/{adapter}?version=1", f"/v1/adapters/{adapter}/files/{WEIGHTS}?version=1",
                f"/v1/models/{model}?version=1", f"/v1/models/{model}/files/config.json?version=1",
                f"/v1/adapters/{adapter}/lineage?version=1"):
        response = client.get(url, headers=tenants.b)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", url
        assert client.get(url, headers=tenants.a).status_code == 200, url
    # the compact form of A's adapter is A's too
    response = client.get(f"/v1/adapters/{adapter}/files/adapter_model.safetensors?format=compact",
                          headers=tenants.b)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert _snapshot(client) == before


def test_other_tenants_models_and_datasets_cannot_tune_or_calibrate_a_merge(tenants):
    """A merge's `tune` (model, validation rows) and rain's `calibration` (model, reasoning and instruction rows)
    name models and datasets too: B naming A's is a 404, as for every other job input."""
    client = tenants.client
    client.headers.update(tenants.a)
    ctx = SimpleNamespace(adapter_dir=tenants.adapter_dir)
    a_model, a_dataset = _upload_model(client, ctx)[0], _upload_dataset(client, ctx)[0]
    b_adapter = _upload_adapter(client, ctx, tenants.b)[0]
    b_model = client.post("/v1/models", files={"archive": ("model.tar.gz", tiny_model_tar())}, data={"name": "m"},
                          headers=tenants.b).json()["id"]
    rows = b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n" for i in range(3))
    b_dataset = client.post("/v1/datasets", files={"file": ("rows.jsonl", rows)}, data={"name": "d"},
                            headers=tenants.b).json()["id"]
    merge = {"type": "merge", "adapters": [{"id": b_adapter}], "method": "task_arithmetic", "params": {}}
    rain = {"type": "merge", "adapters": [{"id": b_adapter}], "method": "rain"}
    bodies = [
        merge | {"tune": {"model": a_model, "validation": [{"adapter": 0, "dataset": b_dataset}],
                          "search": {"lambda": [0.5, 1.0]}}},
        merge | {"tune": {"model": b_model, "validation": [{"adapter": 0, "dataset": a_dataset}],
                          "search": {"lambda": [0.5, 1.0]}}},
        rain | {"calibration": {"model": a_model, "reasoning": b_dataset}},
        rain | {"calibration": {"model": b_model, "reasoning": a_dataset}},
        rain | {"calibration": {"model": b_model, "reasoning": b_dataset, "instruction": a_dataset}},
    ]
    for body in bodies:
        response = client.post("/v1/jobs", json=body, headers=tenants.b)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", (body, response.text)
    # the same jobs with B's own inputs pass admission: the 404s above are about whose ids they are
    own = rain | {"calibration": {"model": b_model, "reasoning": b_dataset, "instruction": b_dataset}}
    assert client.post("/v1/jobs", json=own, headers=tenants.b).status_code == 202


def test_idempotency_keys_are_per_tenant(tenants):
    client = tenants.client
    client.headers.update(tenants.a)
    ctx = SimpleNamespace(adapter_dir=tenants.adapter_dir)
    a_adapter = _upload_adapter(client, ctx)[0]
    b_adapter = _upload_adapter(client, ctx, tenants.b)[0]

    def merge(adapter_id: str) -> dict:
        return {"type": "merge", "adapters": [{"id": adapter_id, "weight": 1.0}], "method": "cat", "params": {}}

    shared = {"Idempotency-Key": "same-key"}
    a_job = client.post("/v1/jobs", json=merge(a_adapter), headers=tenants.a | shared)
    b_job = client.post("/v1/jobs", json=merge(b_adapter), headers=tenants.b | shared)
    assert a_job.status_code == 202 and b_job.status_code == 202, b_job.text
    assert a_job.json()["id"] != b_job.json()["id"]
    # B replaying A's exact body with the same key gets no view of A's job either
    replay = client.post("/v1/jobs", json=merge(a_adapter), headers=tenants.b | shared)
    assert replay.status_code in (404, 409) and a_job.json()["id"] not in replay.text


def _all_routes(app) -> list:
    """The app's routes, with included routers flattened (FastAPI >= 0.16x nests them)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def test_every_route_needs_a_key(tenants):
    client = tenants.client
    client.headers.pop("Authorization", None)
    spec_paths = set(client.app.openapi()["paths"])
    in_spec = {(path, method) for path, method, _ in _operations(client)}
    # every API route is in the spec (a hidden route would escape these checks); the rest are the docs
    for route in _all_routes(client.app):
        if isinstance(getattr(route, "original_route", route), APIRoute):
            for method in route.methods - {"HEAD", "OPTIONS"}:
                assert (route.path, method) in in_spec, f"{method} {route.path} is not in the OpenAPI spec"
        else:
            assert route.path in DOCS_PATHS, f"unexpected non-API route {route.path}"
    assert PUBLIC_PATHS <= spec_paths
    ghost = {name: f"{CREATORS.get(name, ('xx', None))[0]}_{'0' * 24}" for name in
             {n for _, _, op in _operations(client) for n, _ in _path_params(op)}}
    for (_path, name), value in OTHER_PARAMS.items():
        ghost.setdefault(name, value)
    checked = 0
    for path, method, _op in _operations(client):
        url = _fill(path, ghost)
        if path in PUBLIC_PATHS:
            assert client.request(method, url).status_code in (200, 503)
            continue
        for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic YTpi"}):
            response = client.request(method, url, headers=headers)
            assert response.status_code == 401, f"{method} {url} with {headers} -> {response.status_code}"
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers.get("WWW-Authenticate") == "Bearer"
        checked += 1
    assert checked >= 10
    # and the spec says so: every operation but health declares the Bearer scheme
    spec = client.app.openapi()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, method, op in _operations(client):
        declared = op.get("security")
        if path in PUBLIC_PATHS:
            assert not declared, f"{method} {path} is public but declares {declared}"
        else:
            assert declared == [{"HTTPBearer": []}], f"{method} {path} does not declare the Bearer scheme"
    for path in ("/docs", "/openapi.json"):
        assert client.get(path).status_code == 200
