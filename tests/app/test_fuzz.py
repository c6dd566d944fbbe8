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
import os
import struct
import tarfile
import uuid

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.checks.adapter import parse_config, validate_adapter
from app.checks.dataset import validate_jsonl
from app.checks.model import extract_archive
from app.errors import AmendError
from app.main import create_app
from app.schemas.jobs import JobResult
from app.settings import Settings
from app.storage import keys
from tests.factories import tiny_model_tar

# a quick run by default; AMEND_FUZZ_EXAMPLES=200 for a deeper one
EXAMPLES = int(os.environ.get("AMEND_FUZZ_EXAMPLES", "10"))
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
        # unknown query parameters are ignored (FastAPI's and most APIs' behaviour), not a documented refusal
        config = schemathesis.Config.from_dict({"generation": {"allow-extra-parameters": False}})
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
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
        response = client.post("/v1/models", files={"archive": ("m.tar.gz", tiny_model_tar())})
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
    # the key is fixed, not generated: a negative case must not count "no Authorization" as its invalid part
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters, headers=auth)

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


# -- the validators behind the uploads: any bytes give a typed refusal or a summary, never a crash -----

_PARSER_SETTINGS = settings(
    max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
_LORA_NAMES = st.sampled_from(
    [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
        "x.lora_A.weight",
        "__metadata__",
        "",
    ]
)
_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "nope", 3, None])
_INTS = st.one_of(st.integers(-2, 40), st.integers(-(2**63), 2**64), st.floats(allow_nan=True), st.none())
_ENTRY = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": _DTYPES,
            "shape": st.one_of(st.lists(_INTS, max_size=3), st.text(max_size=3)),
            "data_offsets": st.one_of(st.lists(_INTS, min_size=0, max_size=3), st.none()),
        }
    ),
    st.text(max_size=5),
    st.integers(),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def _safetensors_bytes(draw) -> bytes:
    """A header that is mostly well-formed JSON (names, dtypes, shapes, offsets drawn near the real ones),
    a length prefix that may lie, and a payload of any size."""
    header = draw(st.dictionaries(_LORA_NAMES, _ENTRY, max_size=4))
    raw = json.dumps(header).encode() if draw(st.booleans()) else draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**64 - 1), st.integers(0, len(raw) + 8)))
    payload = draw(st.binary(max_size=512))
    return struct.pack("<Q", length) + raw + payload if draw(st.integers(0, 9)) else draw(st.binary(max_size=16))


def _config(rank: int = 4) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@_PARSER_SETTINGS
@given(data=_safetensors_bytes(), rank=st.integers(1, 8))
def test_adapter_weights_parser_never_crashes(tmp_path_factory, data, rank):
    path = tmp_path_factory.mktemp("weights") / "adapter_model.safetensors"
    path.write_bytes(data)
    try:
        summary = validate_adapter(_config(rank), path, max_header_bytes=4096, max_tensors=16)
    except AmendError as error:
        assert 400 <= error.status < 500
    else:
        assert summary.rank == rank and summary.n_modules >= 1


@_PARSER_SETTINGS
@given(raw=st.one_of(st.binary(max_size=300), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                         "use_dora", "lora_bias", "x"]), inner, max_size=6),
    max_leaves=12,
).map(lambda value: json.dumps(value).encode())))
def test_adapter_config_parser_never_crashes(raw):
    try:
        config = parse_config(raw, 1024)
    except AmendError as error:
        assert 400 <= error.status < 500
    else:
        assert isinstance(config, dict) and str(config["peft_type"]).upper() == "LORA"


_ROW = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=5), "completion": st.text(max_size=5)}),
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=5), st.integers())}),
    st.fixed_dictionaries({"text": st.text(max_size=5), "label": st.one_of(st.integers(-3, 5), st.floats(),
                                                                           st.booleans(), st.text(max_size=2))}),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)


@_PARSER_SETTINGS
@given(lines=st.lists(st.one_of(_ROW.map(lambda row: json.dumps(row).encode()), st.binary(max_size=20),
                                st.just(b""), st.just(b"NaN"), st.just(b'{"text": Infinity}')), max_size=6),
       num_labels=st.one_of(st.none(), st.integers(1, 4)))
def test_dataset_parser_never_crashes(tmp_path_factory, lines, num_labels):
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        summary = validate_jsonl(path, num_labels=num_labels, max_rows=5, max_row_bytes=64)
    except AmendError as error:
        assert 400 <= error.status < 500
    else:
        assert 1 <= summary.rows <= 5 and len(summary.row_sha256) == summary.rows


@_PARSER_SETTINGS
@given(members=st.lists(st.tuples(
    st.sampled_from(["config.json", "model.safetensors", "tokenizer.json", "m/config.json", "../x", "/abs",
                     "a/b/c", "model.bin", "run.py", "", ".", "m/", "config.json"]),
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]),
    st.binary(max_size=40),
), max_size=5), gzip=st.booleans(), truncate=st.integers(0, 3))
def test_model_archive_extraction_never_crashes(tmp_path_factory, members, gzip, truncate):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "../../etc/passwd"
                tar.addfile(info)
    raw = buffer.getvalue()
    raw = raw[: len(raw) * (4 - truncate) // 4] if truncate else raw
    scratch = tmp_path_factory.mktemp("archive")
    (scratch / "archive").write_bytes(raw)
    try:
        files = extract_archive(scratch / "archive", scratch / "files", max_files=4, max_bytes=100)
    except AmendError as error:
        assert 400 <= error.status < 500
    else:
        for path in files.values():  # whatever was accepted is a plain file inside the destination
            assert path.resolve().is_relative_to((scratch / "files").resolve()) and not path.is_symlink()
