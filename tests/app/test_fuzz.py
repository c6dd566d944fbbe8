"""Property-based fuzzing of every operation in the app's own OpenAPI spec with schemathesis, in-process
(ASGI, no network), with a valid Bearer key, a real redis-server and moto's in-process S3.

Each operation gets a few dozen positive (schema-valid) and negative (schema-invalid) requests, with random
ids and with ids of records that exist. The checks: never a 5xx; every status code, content type, header
and body is the one the spec documents; schema-invalid input is refused with a 4xx; the same request
without the key, or with a wrong one, is refused (schemathesis' `ignored_auth`). The examples are bounded
so the whole file runs in about a minute on two cores.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from safetensors.numpy import save as save_numpy
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.schemas.jobs import JobResult
from app.settings import Settings
from app.storage import keys

EXAMPLES = 10
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
WEIGHTS = "adapter_model.safetensors"


def _operations() -> list[tuple[str, str]]:
    spec = create_app(Settings(environment="test")).openapi()  # offline: nothing connects until a request
    return [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    ]


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, bytes]:
    from tests.factories import make_adapter

    directory = make_adapter(tmp_path_factory.mktemp("fuzz-adapter"))
    return {name: (directory / name).read_bytes() for name in ("adapter_config.json", WEIGHTS)}


def _model_tar() -> bytes:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 4}
    files = {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save_numpy({"model.embed_tokens.weight": np.ones((16, 4), dtype=np.float32)}),
        "tokenizer.json": b'{"version": "1.0"}',
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def service(redis_url, redis_client, moto_s3, adapter_files):
    """The app with a key for tenant A and one record of each kind (jobs finished, so streams end)."""
    key = f"fuzz-{uuid.uuid4().hex}"
    app_settings = Settings(
        environment="test",
        redis_url=redis_url,
        s3_bucket=f"fuzz-{uuid.uuid4().hex[:12]}",
        api_keys=f"{key}:tenant-a:read+write+admin",
        max_upload_bytes=4 * 2**20,
    )
    app = create_app(app_settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        ids = _seed(client, adapter_files)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        yield schema, {"Authorization": f"Bearer {key}"}, ids


def _seed(client: TestClient, adapter_files: dict[str, bytes]) -> dict[str, str]:
    ids: dict[str, str] = {}
    response = client.post(
        "/v1/adapters",
        files={"config": ("adapter_config.json", adapter_files["adapter_config.json"]),
               "weights": (WEIGHTS, adapter_files[WEIGHTS])},
    )
    assert response.status_code == 201, response.text
    ids["adapter_id"] = response.json()["id"]
    spec_paths = client.app.openapi()["paths"]
    if "/v1/models" in spec_paths:
        response = client.post("/v1/models", files={"archive": ("m.tar.gz", _model_tar())})
        assert response.status_code == 201, response.text
        ids["model_id"] = response.json()["id"]
    if "/v1/datasets" in spec_paths:
        rows = b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n" for i in range(3))
        response = client.post("/v1/datasets", files={"file": ("rows.jsonl", rows)})
        assert response.status_code == 201, response.text
        ids["dataset_id"] = response.json()["id"]
    merge = {"type": "merge", "adapters": [{"id": ids["adapter_id"], "weight": 1.0}], "method": "cat"}
    response = client.post("/v1/jobs", json=merge)
    assert response.status_code == 202, response.text
    ids["job_id"] = job_id = response.json()["id"]
    records = client.app.state.records
    report_key = keys.job("tenant-a", job_id, "report.json")
    records.storage.put_json(report_key, {"modules": {}})

    def finish(record) -> bool:
        record.state, record.progress, record.stage = "succeeded", 1.0, "done"
        record.result = JobResult(adapter_id=ids["adapter_id"], report_key=report_key, report={"ok": True})
        return True

    records.mutate_job(job_id, finish)
    return ids


def _run(operation, mode, auth: dict[str, str], path_parameters: dict[str, str] | None, checks) -> None:
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:
        # the key as an explicit header (not a generated one), so ignored_auth probes without it
        case.call_and_validate(headers=auth, checks=checks)

    fuzz()


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation(service, method, path):
    schema, auth, ids = service
    operation = schema[path][method]
    _run(operation, schemathesis.GenerationMode.POSITIVE, auth, None, [*CHECKS, ignored_auth])
    raw = operation.definition.raw
    if raw.get("parameters") or raw.get("requestBody"):  # nothing to make invalid otherwise
        _run(operation, schemathesis.GenerationMode.NEGATIVE, auth, None, [*CHECKS, negative_data_rejection])
    names = [p["name"] for p in raw.get("parameters", []) if p.get("in") == "path"]
    known = {name: ids[name] for name in names if name in ids}
    if known and "filename" in names and "model_id" in names:
        known["filename"] = "config.json"
    if known:  # the same operation on records that exist
        _run(operation, schemathesis.GenerationMode.POSITIVE, auth, known, CHECKS)


def test_conditional_get_status_is_documented(service):
    schema, auth, ids = service
    operation = schema["/v1/jobs/{job_id}"]["GET"]
    first = operation.Case(path_parameters={"job_id": ids["job_id"]}, headers=auth).call()
    assert first.status_code == 200 and first.headers["etag"]
    etag = first.headers["etag"][0]
    case = operation.Case(path_parameters={"job_id": ids["job_id"]}, headers={**auth, "If-None-Match": etag})
    response = case.call()
    assert response.status_code == 304
    case.validate_response(response, checks=CHECKS)


def test_ignored_auth_bites(service):
    """The auth check above is not vacuous: with the key check switched off it fails."""
    from app.api.deps import Caller, get_caller

    schema, auth, ids = service
    schema.app.dependency_overrides[get_caller] = lambda: Caller("tenant-a", frozenset({"read", "write", "admin"}))
    case = schema["/v1/adapters/{adapter_id}"]["GET"].Case(path_parameters={"adapter_id": ids["adapter_id"]})
    with pytest.raises(BaseException, match="without authentication"):
        case.call_and_validate(headers=auth, checks=[ignored_auth])
