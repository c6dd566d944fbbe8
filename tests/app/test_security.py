"""Security properties of the API, with a real redis-server and moto's in-process S3 (no worker runs).

Scopes, hashed keys, secrets kept out of logs, upload limits enforced while streaming, safetensors limits,
the dtype whitelist, pickle never loaded, names as labels only, per-tenant quotas and parameter limits.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import logging
import pickle
import re
import struct
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from app.logs import JsonFormatter
from app.main import create_app
from app.queue import celery_config
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
S3_SECRET = "s3-secret-" + uuid.uuid4().hex
AUDIT_KEY = "audit-key-" + uuid.uuid4().hex
WEIGHTS = "adapter_model.safetensors"
KEY_PATTERN = re.compile(
    r"^tenants/tenant-[ab]/(adapters/ad_[0-9a-f]{24}/(adapter_config\.json|adapter_model\.safetensors|record\.json)"
    r"|jobs/jb_[0-9a-f]{24}/record\.json)$"
)


# -- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
def make_api(redis_url, redis_client, moto_s3):
    """A factory of TestClients on fresh settings; keys for tenant A (read+write, read, write, admin) and B."""
    stack = ExitStack()

    def build(**overrides) -> TestClient:
        keys = SimpleNamespace(**{name: f"{name}-{uuid.uuid4().hex}" for name in ("a", "ro", "wo", "admin", "b")})
        api_keys = (
            f"{keys.a}:tenant-a,{keys.ro}:tenant-a:read,{keys.wo}:tenant-a:write,"
            f"{keys.admin}:tenant-a:admin,{keys.b}:tenant-b"
        )
        settings = Settings(
            **{
                "environment": "test",
                "redis_url": redis_url,
                "s3_bucket": f"sec-{uuid.uuid4().hex[:12]}",
                "s3_secret_access_key": S3_SECRET,
                "audit_hmac_key": AUDIT_KEY,
                "api_keys": api_keys,
                "max_upload_bytes": 2 * 2**20,
            }
            | overrides
        )
        client = stack.enter_context(TestClient(create_app(settings)))
        client.headers["Authorization"] = f"Bearer {keys.a}"
        client.keys = keys  # type: ignore[attr-defined]
        client.records = client.app.state.records  # type: ignore[attr-defined]
        return client

    with stack:
        yield build


@pytest.fixture
def api(make_api):
    return make_api()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(client, directory, name="a", *, weights_name=WEIGHTS, weights=None, config=None, headers=None):
    weights = (directory / WEIGHTS).read_bytes() if weights is None else weights
    config = (directory / "adapter_config.json").read_bytes() if config is None else config
    return client.post(
        "/v1/adapters",
        files={"config": ("adapter_config.json", config, "application/json"), "weights": (weights_name, weights)},
        data={"name": name},
        headers=headers or {},
    )


def merge_body(*ids, method="task_arithmetic", params=None, output=None):
    return {
        "type": "merge",
        "adapters": [{"id": i, "weight": 1.0} for i in ids],
        "method": method,
        "params": params or {},
        "output": output or {"name": "m", "rank": 4},
    }


def stored_keys(client) -> list[str]:
    return list(client.records.storage.list_keys("tenants/"))


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict, payload: bytes, header_len: int | None = None) -> bytes:
    """A safetensors file; `header_len` pads the JSON header with spaces (as the format allows)."""
    raw = json.dumps(header).encode()
    if header_len is not None:
        assert header_len >= len(raw)
        raw += b" " * (header_len - len(raw))
    return struct.pack("<Q", len(raw)) + raw + payload


def with_dtype(directory: Path, dtype: str) -> bytes:
    """The adapter's F32 weights relabelled as another 4-byte dtype (the offsets stay valid)."""
    header, payload = split_safetensors((directory / WEIGHTS).read_bytes())
    for name, entry in header.items():
        if name != "__metadata__":
            entry["dtype"] = dtype
    return join_safetensors(header, payload)


# -- scopes -----------------------------------------------------------------------------------------


def test_read_only_key_cannot_write(api, adapter_dir):
    directory = adapter_dir()
    ro = bearer(api.keys.ro)
    assert_error(upload(api, directory, headers=ro), 403, "forbidden")
    assert stored_keys(api) == []

    adapter_id = upload(api, directory).json()["id"]
    job_id = api.post("/v1/jobs", json=merge_body(adapter_id)).json()["id"]
    before = sorted(stored_keys(api))

    assert_error(api.post("/v1/jobs", json=merge_body(adapter_id), headers=ro), 403, "forbidden")
    assert_error(api.delete(f"/v1/adapters/{adapter_id}", headers=ro), 403, "forbidden")
    assert_error(api.post(f"/v1/jobs/{job_id}/cancel", headers=ro), 403, "forbidden")
    assert "scope" in api.post(f"/v1/jobs/{job_id}/cancel", headers=ro).json()["error"]["message"]

    # nothing changed, and reading still works with the read-only key
    assert sorted(stored_keys(api)) == before
    assert api.get(f"/v1/adapters/{adapter_id}", headers=ro).status_code == 200
    assert api.get(f"/v1/jobs/{job_id}", headers=ro).json()["state"] == "queued"
    assert [j["id"] for j in api.get("/v1/jobs", headers=ro).json()["items"]] == [job_id]


def test_write_only_key_cannot_read(api, adapter_dir):
    adapter_id = upload(api, adapter_dir()).json()["id"]
    wo = bearer(api.keys.wo)
    assert_error(api.get("/v1/adapters", headers=wo), 403, "forbidden")
    assert_error(api.get(f"/v1/adapters/{adapter_id}", headers=wo), 403, "forbidden")


def test_admin_key_can_do_everything(api, adapter_dir):
    admin = bearer(api.keys.admin)
    response = upload(api, adapter_dir(), headers=admin)
    assert response.status_code == 201, response.text
    adapter_id = response.json()["id"]
    job = api.post("/v1/jobs", json=merge_body(adapter_id), headers=admin)
    assert job.status_code == 202, job.text
    assert api.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=admin).json()["state"] == "cancelled"
    assert api.get("/v1/adapters", headers=admin).status_code == 200
    assert api.delete(f"/v1/adapters/{adapter_id}", headers=admin).status_code == 204


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "Token {key}", "Bearer {key}x", "Bearer x{key}", "{key}"],
)
def test_bad_credentials_are_401(api, header):
    response = api.get("/v1/adapters", headers={"Authorization": header.format(key=api.keys.a)})
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


# -- keys are stored hashed -------------------------------------------------------------------------


def _strings_in(value, seen: set[int], depth: int = 0):
    """Every string reachable from `value` (secrets unwrapped), for a raw-key search."""
    if id(value) in seen or depth > 8:
        return
    seen.add(id(value))
    if isinstance(value, str | bytes):
        yield value if isinstance(value, str) else value.decode("latin-1")
        return
    if hasattr(value, "get_secret_value"):
        yield from _strings_in(value.get_secret_value(), seen, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings_in(k, seen, depth + 1)
            yield from _strings_in(v, seen, depth + 1)
        return
    if isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _strings_in(item, seen, depth + 1)
        return
    if hasattr(value, "__pydantic_fields__"):
        for name in type(value).model_fields:
            yield from _strings_in(getattr(value, name), seen, depth + 1)
        return
    if hasattr(value, "__slots__"):
        for name in value.__slots__:
            yield from _strings_in(getattr(value, name, None), seen, depth + 1)


def test_app_state_holds_only_key_digests(api):
    state = api.app.state._state
    digests = {hashlib.sha256(key.encode()).hexdigest() for key in vars(api.keys).values()}
    assert set(state["api_keys"]) == digests
    assert set(state["settings"].parsed_api_keys()) == digests  # the settings copy keeps the digests only
    found = "\n".join(_strings_in({k: v for k, v in state.items() if k not in ("records", "celery")}, set()))
    for key in vars(api.keys).values():
        assert key not in found


def test_sha256_keys_work_and_the_digest_is_not_a_key(make_api, redis_url):
    raw = "raw-" + uuid.uuid4().hex
    digest = hashlib.sha256(raw.encode()).hexdigest()
    api = make_api()
    settings = Settings(
        environment="test",
        redis_url=redis_url,
        s3_bucket=api.app.state.settings.s3_bucket,
        api_keys=f"sha256:{digest}:tenant-a:read",
    )
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/v1/adapters", headers=bearer(raw)).status_code == 200
        assert_error(client.get("/v1/adapters", headers=bearer(digest)), 401, "unauthorized")
        assert_error(client.get("/v1/adapters", headers=bearer(f"sha256:{digest}")), 401, "unauthorized")
        assert_error(client.post("/v1/jobs", json=merge_body("ad_" + "0" * 24), headers=bearer(raw)), 403, "forbidden")


# -- secrets never reach the logs -------------------------------------------------------------------


def test_secrets_never_logged(make_api, adapter_dir, caplog, capfd, monkeypatch):
    api = make_api()
    # create_app installs the JSON handler as the only root handler: listen beside it, at every level
    logging.getLogger().addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    directory = adapter_dir()
    adapter_id = upload(api, directory).json()["id"]
    job_id = api.post("/v1/jobs", json=merge_body(adapter_id)).json()["id"]
    api.get(f"/v1/jobs/{job_id}")
    api.post(f"/v1/jobs/{job_id}/cancel")
    upload(api, directory, weights=b"\x80\x04not a safetensors file")  # 415
    upload(api, directory, config=b"{not json")  # 400
    api.get("/v1/adapters/ad_" + "0" * 24)  # 404
    api.get("/v1/adapters", headers=bearer("wrong-" + api.keys.a))  # 401 with a near-miss key
    api.post("/v1/jobs", json={"type": "merge", "adapters": [], "method": "cat"})  # 422

    def explode(*args, **kwargs):
        raise RuntimeError("storage exploded")

    monkeypatch.setattr(api.records, "get_job", explode)
    monkeypatch.setattr(api.records, "job_from_index", explode)  # the polling paths (api/fastpath.py, deps)
    with TestClient(api.app, raise_server_exceptions=False) as client:
        assert_error(client.get(f"/v1/jobs/{job_id}", headers=bearer(api.keys.a)), 500, "internal_error")

    formatter = JsonFormatter()
    text = "\n".join(formatter.format(record) for record in caplog.records)
    captured = capfd.readouterr()
    text += captured.out + captured.err  # what the service's own JSON handler wrote
    assert "unhandled error" in text and "storage exploded" in text  # the 500 was logged with its traceback
    secrets = [S3_SECRET, AUDIT_KEY, *vars(api.keys).values()]
    for secret in secrets:
        assert secret not in text
    settings = api.app.state.settings
    for rendered in (repr(settings), str(settings), str(settings.model_dump()), settings.model_dump_json()):
        for secret in secrets:
            assert secret not in rendered


# -- upload limits, enforced while streaming --------------------------------------------------------


def _asgi(app, method: str, path: str, headers: dict[str, str], chunks) -> tuple[int, dict, int]:
    """Call the ASGI app directly with a streamed body; returns (status, JSON body, chunks the app read)."""
    sent: list[dict] = []
    read = 0

    async def run() -> None:
        source = iter(chunks)

        async def receive() -> dict:
            nonlocal read
            chunk = next(source, None)
            if chunk is None:
                return {"type": "http.request", "body": b"", "more_body": False}
            read += 1
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), read


def test_413_from_content_length_before_the_body_is_read(api):
    def never():
        raise AssertionError("the body was read")
        yield b""  # pragma: no cover

    status, body, read = _asgi(
        api.app,
        "POST",
        "/v1/adapters",
        {"authorization": f"Bearer {api.keys.a}", "content-type": "multipart/form-data; boundary=x",
         "content-length": str(10 * 2**30)},
        never(),
    )
    assert (status, body["error"]["code"], read) == (413, "payload_too_large", 0)
    assert stored_keys(api) == []


def test_413_for_a_chunked_body_over_the_limit(api):
    settings = api.app.state.settings
    limit = settings.max_upload_bytes + settings.max_config_bytes + (1 << 20)
    chunk = 64 * 1024
    boundary = "amendboundary"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"{WEIGHTS}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    total_chunks = 4 * limit // chunk  # four times the limit, if nobody stopped reading

    def body():
        yield head
        for _ in range(total_chunks):
            yield b"\0" * chunk

    status, response, read = _asgi(
        api.app,
        "POST",
        "/v1/adapters",
        {"authorization": f"Bearer {api.keys.a}", "content-type": f"multipart/form-data; boundary={boundary}"},
        body(),
    )
    assert (status, response["error"]["code"]) == (413, "payload_too_large")
    assert read <= limit // chunk + 3, f"read {read} chunks of {chunk} bytes past a {limit}-byte limit"
    assert stored_keys(api) == []

    # and the same through an HTTP client sending Transfer-Encoding: chunked (no Content-Length)
    sent = api.post(
        "/v1/adapters",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_error(sent, 413, "payload_too_large")
    assert stored_keys(api) == []


def test_per_file_limits(make_api, adapter_dir):
    directory = adapter_dir()
    size = len((directory / WEIGHTS).read_bytes())
    api = make_api()
    small = make_api(max_upload_bytes=1024, max_config_bytes=1024)
    assert size > 1024
    assert_error(upload(small, directory), 413, "payload_too_large")
    big_config = json.dumps(json.loads((directory / "adapter_config.json").read_text()) | {"pad": "x" * 300_000})
    assert_error(upload(api, directory, config=big_config.encode()), 413, "payload_too_large")
    assert stored_keys(api) == [] and stored_keys(small) == []


# -- safetensors limits and dtype whitelist ---------------------------------------------------------


def test_safetensors_header_size_limit(make_api, adapter_dir):
    directory = adapter_dir()
    header, payload = split_safetensors((directory / WEIGHTS).read_bytes())
    api = make_api(max_safetensors_header_bytes=1024)
    padded = join_safetensors(header, payload, 4096)
    error = assert_error(upload(api, directory, weights=padded), 400, "invalid_adapter")
    assert "header" in error["message"] and "1024" in error["message"]
    # a forged length far past the file is refused without allocating it
    forged = struct.pack("<Q", 2**62) + b"{}" + b"\0" * 64
    assert_error(upload(api, directory, weights=forged), 400, "invalid_adapter")
    forged = struct.pack("<Q", 900) + b"{}"  # within the limit but past the end of the file
    assert "truncated" in assert_error(upload(api, directory, weights=forged), 400, "invalid_adapter")["message"]
    assert stored_keys(api) == []


def test_safetensors_tensor_count_limit(make_api, adapter_dir):
    directory = adapter_dir()
    api = make_api(max_tensors=3)
    error = assert_error(upload(api, directory), 400, "invalid_adapter")
    assert "tensors" in error["message"] and "3" in error["message"]
    assert stored_keys(api) == []


def test_padded_header_is_not_mistaken_for_pickle(api, adapter_dir):
    """A safetensors header length whose low bytes look like a pickle opcode (0x0480 -> b"\\x80\\x04") is a
    legal safetensors file: header JSON may be padded with spaces."""
    directory = adapter_dir()
    header, payload = split_safetensors((directory / WEIGHTS).read_bytes())
    for length in (0x0480, 0x0580):
        response = upload(api, directory, weights=join_safetensors(header, payload, length))
        assert response.status_code == 201, response.text


@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_integer_tensors_refused(api, adapter_dir, dtype):
    directory = adapter_dir()
    error = assert_error(upload(api, directory, weights=with_dtype(directory, dtype)), 400, "invalid_adapter")
    assert "float" in error["message"]
    assert stored_keys(api) == []


@pytest.mark.parametrize("dtype, width", [("I8", 1), ("U8", 1), ("BOOL", 1), ("I64", 8), ("F8_E4M3", 1), ("C64", 8)])
def test_other_non_float_dtypes_refused(api, adapter_dir, dtype, width):
    directory = adapter_dir()
    header = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
            "dtype": dtype, "shape": [4, 32], "data_offsets": [0, 128 * width]},
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": {
            "dtype": dtype, "shape": [32, 4], "data_offsets": [128 * width, 256 * width]},
    }
    weights = join_safetensors(header, b"\x01" * 256 * width)
    assert_error(upload(api, directory, weights=weights), 400, "invalid_adapter")
    assert stored_keys(api) == []


# -- pickle is never loaded -------------------------------------------------------------------------


class _Canary:
    """Unpickling this creates a file: proof that someone loaded the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def pickles(tmp_path_factory) -> tuple[dict[str, bytes], Path]:
    """Pickled files that create `marker` when loaded: torch.save (zip and legacy) and raw pickles."""
    import torch

    tmp_path = tmp_path_factory.mktemp("pickles")

    marker = tmp_path / "unpickled"
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
             "canary": _Canary(marker)}
    files = {}
    torch.save(state, tmp_path / "zip.pt")
    files["torch_zip"] = (tmp_path / "zip.pt").read_bytes()
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    files["torch_legacy"] = (tmp_path / "legacy.pt").read_bytes()
    for protocol in (2, 3, 4, 5):
        files[f"pickle_{protocol}"] = pickle.dumps(_Canary(marker), protocol=protocol)
    return files, marker


@pytest.mark.parametrize("weights_name", [WEIGHTS, "adapter_model.bin", "adapter_model.pt", "ADAPTER.PTH"])
def test_pickle_weights_refused_and_never_loaded(api, adapter_dir, pickles, weights_name):
    directory = adapter_dir()
    files, marker = pickles
    for kind, data in files.items():
        response = upload(api, directory, weights_name=weights_name, weights=data)
        assert_error(response, 415, "unsupported_media_type")
        assert not marker.exists(), f"{kind} was unpickled"
    assert stored_keys(api) == []
    assert api.get("/v1/adapters").json()["items"] == []


_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _source_files():
    for package in ("app", "workers"):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_no_pickle_loading_in_the_service_source():
    """Neither the API nor the workers import a pickle module or call torch.load / numpy.load."""
    problems = []
    for path in _source_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(name.split(".")[0] in _PICKLE_MODULES for name in names):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {names}")
                if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy") and any(
                    a.name == "load" for a in node.names
                ):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.load")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                func = node.func
                if func.attr in ("load", "loads") and isinstance(func.value, ast.Name) and func.value.id in (
                    "torch", "np", "numpy", *_PICKLE_MODULES
                ):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {func.value.id}.{func.attr}")
                if any(kw.arg == "allow_pickle" for kw in node.keywords):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} passes allow_pickle")
                if any(
                    kw.arg == "use_safetensors" and isinstance(kw.value, ast.Constant) and kw.value.value is False
                    for kw in node.keywords
                ):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} passes use_safetensors=False")
    assert problems == []


def test_celery_accepts_json_only():
    config = celery_config(Settings(environment="test"))
    assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"


# -- names are labels only --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "..\\..\\windows", "a/../../b", "%2e%2e%2f", "é/ü\n"]
)
def test_names_are_labels_only(api, adapter_dir, name):
    directory = adapter_dir()
    response = upload(api, directory, name, weights_name=f"../../{name}.safetensors")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == name
    adapter_id = response.json()["id"]
    assert api.get(f"/v1/adapters/{adapter_id}").json()["name"] == name
    job = api.post("/v1/jobs", json=merge_body(adapter_id, output={"name": name, "rank": 4}))
    assert job.status_code == 202, job.text
    assert job.json()["spec"]["output"]["name"] == name
    keys = stored_keys(api)
    assert keys and all(KEY_PATTERN.match(key) for key in keys), keys


# -- per-tenant quotas ------------------------------------------------------------------------------


def test_job_quota_per_tenant(make_api, adapter_dir):
    api = make_api(max_jobs_per_tenant=1)
    adapter_id = upload(api, adapter_dir()).json()["id"]
    first = api.post("/v1/jobs", json=merge_body(adapter_id))
    assert first.status_code == 202
    refused = api.post("/v1/jobs", json=merge_body(adapter_id), headers={"Idempotency-Key": "quota-1"})
    error = assert_error(refused, 429, "quota_exceeded")
    assert "at most 1" in error["message"] and "job" in error["message"]
    assert [j["id"] for j in api.get("/v1/jobs").json()["items"]] == [first.json()["id"]]
    # another tenant is not affected
    other = bearer(api.keys.b)
    b_adapter = upload(api, adapter_dir(), headers=other).json()["id"]
    assert api.post("/v1/jobs", json=merge_body(b_adapter), headers=other).status_code == 202
    # a finished job frees the slot, and the refused Idempotency-Key was released
    api.post(f"/v1/jobs/{first.json()['id']}/cancel")
    again = api.post("/v1/jobs", json=merge_body(adapter_id), headers={"Idempotency-Key": "quota-1"})
    assert again.status_code == 202, again.text


def test_storage_quota_per_tenant(make_api, adapter_dir):
    directory = adapter_dir()
    size = len((directory / WEIGHTS).read_bytes())
    api = make_api(max_bytes_per_tenant=size + size // 2)
    first = upload(api, directory)
    assert first.status_code == 201
    before = sorted(stored_keys(api))
    refused = upload(api, directory)
    assert refused.status_code in (413, 429), refused.text
    assert refused.json()["error"]["code"] in ("quota_exceeded", "payload_too_large")
    assert "quota" in refused.json()["error"]["message"]
    assert sorted(stored_keys(api)) == before
    assert len(api.get("/v1/adapters").json()["items"]) == 1
    assert upload(api, directory, headers=bearer(api.keys.b)).status_code == 201  # tenant B has its own quota
    assert api.delete(f"/v1/adapters/{first.json()['id']}").status_code == 204
    assert upload(api, directory).status_code == 201  # deleting frees the quota


# -- parameter limits -------------------------------------------------------------------------------


def test_too_many_adapters(make_api, adapter_dir):
    api = make_api(max_merge_adapters=2)
    ids = [upload(api, adapter_dir(f"d{i}", seed=i)).json()["id"] for i in range(3)]
    assert api.post("/v1/jobs", json=merge_body(*ids[:2])).status_code == 202
    error = assert_error(api.post("/v1/jobs", json=merge_body(*ids)), 422, "too_many_adapters")
    assert "2" in error["message"]
    # past the schema's hard cap the spec is refused before any lookup
    assert_error(api.post("/v1/jobs", json=merge_body(*([ids[0]] * 65))), 422, "validation_error")


@pytest.mark.parametrize(
    "change",
    [
        {"output": {"rank": 1025}},
        {"output": {"rank": 0}},
        {"output": {"rank": -1}},
        {"output": {"rank_pattern": {"q_proj": 5000}}},
        {"output": {"rank_pattern": {f"m{i}": 1 for i in range(4097)}}},
        {"output": {"name": "x" * 129}},
        {"output": {"energy": 0}},
        {"output": {"energy": 1.5}},
        {"params": {"density": -0.01}},
        {"params": {"density": 1.01}},
        {"params": {"density": 1e308}},
        {"params": {"density": "half"}},
        {"params": {"lambda": 11}},
        {"params": {"seed": 2**31}},
        {"params": {"gamma": 0.9, "density": 0.5}},
        {"params": {f"p{i}": 1 for i in range(33)}},
        {"adapters": [{"id": "ad_" + "0" * 24, "weight": 101}]},
        {"adapters": [{"id": "../../etc/passwd", "weight": 1}]},
        {"adapters": []},
        {"method": "pickle"},
        {"surprise": 1},
    ],
)
def test_parameter_limits(api, change):
    body = merge_body("ad_" + "0" * 24, method="breadcrumbs") | change
    assert_error(api.post("/v1/jobs", json=body), 422, "validation_error")
    assert api.get("/v1/jobs").json()["items"] == []


@pytest.mark.parametrize("field", ["density", "lambda", "weight"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_refused(api, field, value):
    body = merge_body("ad_" + "0" * 24, method="ties")
    text = json.dumps(body)
    if field == "weight":
        text = text.replace('"weight": 1.0', f'"weight": {value}')
    else:
        text = text.replace('"params": {}', f'"params": {{"{field}": {value}}}')
    response = api.post("/v1/jobs", content=text, headers={"Content-Type": "application/json"})
    assert_error(response, 422)
    assert api.get("/v1/jobs").json()["items"] == []


@pytest.mark.parametrize("path", ["/v1/adapters", "/v1/datasets", "/v1/models", "/v1/jobs"])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-key", "Basic YTpi"])
def test_unauthenticated_body_is_never_read(api, path, authorization):
    """Without a valid key the body is refused before it is read: nobody can make the service spool
    gigabytes to disk without a key."""
    chunk = 64 * 1024
    headers = {"content-type": "multipart/form-data; boundary=x"}
    if authorization:
        headers["authorization"] = authorization
    body = (b"--x\r\n" + b"\0" * chunk for _ in range(64))
    status, response, read = _asgi(api.app, "POST", path, headers, body)
    assert (status, response["error"]["code"]) == (401, "unauthorized")
    assert read <= 1, f"read {read} chunks of an unauthenticated body"


def _concurrently(calls: int, call) -> list:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(calls) as pool:
        return list(pool.map(lambda _: call(), range(calls)))


def test_storage_quota_holds_under_concurrent_uploads(make_api, adapter_dir):
    directory = adapter_dir()
    size = len((directory / WEIGHTS).read_bytes())
    api = make_api(max_bytes_per_tenant=size + size // 2)
    statuses = sorted(r.status_code for r in _concurrently(6, lambda: upload(api, directory)))
    assert statuses.count(201) == 1, statuses
    assert len(api.get("/v1/adapters").json()["items"]) == 1
    assert api.records.stored_bytes("tenant-a") == size


def test_job_quota_holds_under_concurrent_submissions(make_api, adapter_dir):
    api = make_api(max_jobs_per_tenant=1)
    adapter_id = upload(api, adapter_dir()).json()["id"]
    responses = _concurrently(6, lambda: api.post("/v1/jobs", json=merge_body(adapter_id)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(202) == 1, statuses
    assert len(api.get("/v1/jobs").json()["items"]) == 1


def test_json_bodies_have_their_own_small_limit(make_api):
    """Only multipart uploads may be large: a JSON body is parsed whole in memory, so a 5 MiB job spec is
    refused (from Content-Length, or while a chunked body streams) instead of being read."""
    from app.limits import MAX_OTHER_BODY_BYTES

    api = make_api(max_upload_bytes=16 * 2**20)
    assert api.app.state.settings.max_upload_bytes > MAX_OTHER_BODY_BYTES  # the JSON limit is the smaller one
    big = b'{"type": "merge", "pad": "' + b"x" * (MAX_OTHER_BODY_BYTES + 1) + b'"}'
    headers = {"authorization": f"Bearer {api.keys.a}", "content-type": "application/json"}
    status, body, read = _asgi(api.app, "POST", "/v1/jobs", headers | {"content-length": str(len(big))}, iter([big]))
    assert (status, body["error"]["code"], read) == (413, "payload_too_large", 0)
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    status, body, read = _asgi(api.app, "POST", "/v1/jobs", headers, chunks)
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    assert read <= MAX_OTHER_BODY_BYTES // 65536 + 2
    # a job spec at the schema's own limits still fits
    pattern = {"m" * 500 + str(i): 4 for i in range(4096)}
    spec = merge_body(*(["ad_" + "0" * 24] * 64), output={"rank_pattern": pattern})
    assert len(json.dumps(spec)) < MAX_OTHER_BODY_BYTES
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 404, response.text  # got past the limit and the schema to the lookup


def _tar(files: dict[str, bytes], gzip: bool = True) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("filename", ["data.safetensors", "rows.jsonl", "data.pt", "data.npy"])
def test_pickled_datasets_refused_and_never_loaded(api, pickles, filename):
    files, marker = pickles
    for kind, data in files.items():
        response = api.post("/v1/datasets", files={"file": (filename, data)}, data={"num_labels": "2"})
        assert 400 <= response.status_code < 500 and response.status_code not in (401, 403), (kind, response.text)
        assert response.json()["error"]["code"] in ("unsupported_media_type", "invalid_dataset"), response.text
        assert not marker.exists(), f"{kind} was unpickled"
    assert stored_keys(api) == []


@pytest.mark.parametrize("member", ["model.safetensors", "pytorch_model.bin", "model.pt", "optimizer.pkl"])
def test_pickled_model_files_refused_and_never_loaded(api, pickles, member):
    config = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()
    files, marker = pickles
    for kind, data in files.items():
        archive = _tar({"config.json": config, member: data})
        response = api.post("/v1/models", files={"archive": ("model.tar.gz", archive)})
        assert response.status_code in (400, 415), (kind, response.text)
        assert not marker.exists(), f"{kind} was unpickled"
    assert stored_keys(api) == []


def test_storage_quota_holds_under_concurrent_dataset_uploads(make_api):
    rows = b"".join(json.dumps({"prompt": f"q{i}", "completion": "a" * 40}).encode() + b"\n" for i in range(40))
    api = make_api(max_bytes_per_tenant=len(rows) + len(rows) // 2)
    post = lambda: api.post("/v1/datasets", files={"file": ("rows.jsonl", rows)})  # noqa: E731
    statuses = sorted(r.status_code for r in _concurrently(6, post))
    assert statuses.count(201) == 1 and set(statuses) <= {201, 429}, statuses
    assert api.records.stored_bytes("tenant-a") == len(rows)


def test_model_archives_have_their_own_limit(make_api):
    """A model tar is held to AMEND_MAX_MODEL_ARCHIVE_BYTES, not to the adapter upload limit: a 2 MiB archive
    is accepted under an 8 MiB archive limit though adapters are limited to 64 KiB, and an archive past its
    limit is 413 from Content-Length before it is read."""
    import numpy as np
    from safetensors.numpy import save as save_numpy

    api = make_api(max_upload_bytes=64 * 1024, max_config_bytes=1024, max_model_archive_bytes=8 * 2**20,
                   max_model_bytes=8 * 2**20)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 4}
    weights = save_numpy({"model.embed_tokens.weight": np.ones((512, 1024), dtype=np.float32)})
    archive = _tar({"config.json": json.dumps(config).encode(), "model.safetensors": weights}, gzip=False)
    assert 2 * 2**20 < len(archive) < 8 * 2**20
    response = api.post("/v1/models", files={"archive": ("model.tar", archive)})
    assert response.status_code == 201, response.text
    status, body, read = _asgi(
        api.app,
        "POST",
        "/v1/models",
        {"authorization": f"Bearer {api.keys.a}", "content-type": "multipart/form-data; boundary=x",
         "content-length": str(10 * 2**20)},
        iter([b"--x"]),
    )
    assert (status, body["error"]["code"], read) == (413, "payload_too_large", 0)


@pytest.mark.parametrize("path", ["/v1/adapters", "/v1/datasets", "/v1/jobs"])
@pytest.mark.parametrize("framing", [{"content-length": str(64 * 65536)}, {"transfer-encoding": "chunked"}])
def test_read_only_key_body_is_never_read(api, path, framing):
    """A key that cannot write gets 403 before its upload is read (a body-less DELETE still meets the record
    check first, so another tenant's ids stay 404)."""
    headers = {"authorization": f"Bearer {api.keys.ro}", "content-type": "multipart/form-data; boundary=x"}
    body = (b"--x\r\n" + b"\0" * 65536 for _ in range(64))
    status, response, read = _asgi(api.app, "POST", path, headers | framing, body)
    assert (status, response["error"]["code"], read) == (403, "forbidden", 0)


def test_an_abandoned_job_reservation_does_not_hold_a_slot_forever(make_api, adapter_dir):
    """A request that crashed between reserving its slot and creating its job leaves an id in the tenant's
    active set; once that reservation is stale it no longer counts against the quota."""
    from app.records import STALE_RESERVATION_SECONDS

    api = make_api(max_jobs_per_tenant=1)
    adapter_id = upload(api, adapter_dir()).json()["id"]
    active = api.records.active_key("tenant-a")
    fresh = f"jb_{int(time.time() * 1e6):014x}{'a' * 10}"
    api.records.index.sadd(active, fresh)  # a reservation in flight: it holds the slot
    assert_error(api.post("/v1/jobs", json=merge_body(adapter_id)), 429, "quota_exceeded")
    api.records.index.srem(active, fresh)
    stale_time = int((time.time() - STALE_RESERVATION_SECONDS - 60) * 1e6)
    api.records.index.sadd(active, f"jb_{stale_time:014x}{'b' * 10}")  # abandoned long ago
    assert api.post("/v1/jobs", json=merge_body(adapter_id)).status_code == 202
