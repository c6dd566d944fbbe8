"""Compression jobs at the door (no worker runs): the contract and the admission checks refuse bad input with
clear 422s (404 for another tenant's ids, as everywhere), and a refused job stores nothing."""

from __future__ import annotations

import io
import tarfile

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.app.test_api import upload
from tests.conftest import tenant_keys
from tests.factories import tiny_llama


@pytest.fixture
def api(redis_url, redis_client, moto_s3):
    key_a, key_b, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        client.other = {"Authorization": f"Bearer {key_b}"}  # type: ignore[attr-defined]
        yield client


def upload_model_dir(client: TestClient, directory, headers: dict | None = None) -> str:
    """Register a saved model folder (tar upload); returns its id."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    response = client.post("/v1/models", files={"archive": ("m.tar", buffer.getvalue())}, headers=headers or {})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def save_llama(directory, **overrides):
    tiny_llama(0, **overrides).save_pretrained(directory)
    return directory


def stored(client: TestClient) -> tuple[list[str], list]:
    records = client.app.state.records
    return sorted(records.storage.list_keys("tenants/")), client.get("/v1/jobs").json()["items"]


def refused(client: TestClient, body: dict, status: int = 422) -> dict:
    before = stored(client)
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert stored(client) == before  # no job, no record, nothing in storage
    return response.json()["error"]


@pytest.fixture
def adapter_id(api, adapter_dir) -> str:
    response = upload(api, adapter_dir("a", r=4, targets=("q_proj", "v_proj")))
    assert response.status_code == 201
    return response.json()["id"]


def job(adapter: str, method: str = "rank_reduce", **fields) -> dict:
    return {"type": "compress", "adapter": adapter, "method": method, **fields}


def test_a_valid_job_is_queued_with_validated_params(api, adapter_id):
    response = api.post("/v1/jobs", json=job(adapter_id, output={"name": "small", "rank": 2}))
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert spec["params"] == {"forgetting_tolerance": 0.1} and spec["output"]["rank"] == 2
    listed = api.get("/v1/jobs?type=compress").json()["items"]
    assert [item["id"] for item in listed] == [response.json()["id"]]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"output": {"rank": 0}}, "rank"),
        ({"output": {"energy": 1.5}}, "energy"),
        ({"output": {"energy": 0}}, "energy"),
        ({"output": {"rank": 2, "energy": 0.9}}, "at most one"),
        ({"output": {"budget_params": 0}}, "budget_params"),
        ({"output": {"rank_pattern": {"q_proj": 0}}}, "rank_pattern"),
        ({"output": {"rank_pattern": {"(": 2}}}, "regular expression"),
        ({"method": "cast", "output": {"rank": 2}}, "cast does not take output.rank"),
        ({"method": "cast", "params": {"dtype": "int4"}}, "dtype"),
        ({"method": "sparsify_quantize", "params": {"density": 0}}, "density"),
        ({"method": "sparsify_quantize", "params": {"bits": "int4"}}, "bits"),
        ({"params": {"unknown": 1}}, "unknown"),
        ({"base_model": "md_0000000000000000"}, "takes an 'adapter'"),
    ],
)
def test_bad_specs_are_refused_with_422(api, adapter_id, fields, says):
    body = job(adapter_id, **{k: v for k, v in fields.items() if k != "method"})
    body["method"] = fields.get("method", "rank_reduce")
    error = refused(api, body)
    assert error["code"] == "validation_error" and says in error["message"], error


def test_extract_specs_are_checked(api, adapter_id):
    base = {"type": "compress", "method": "extract", "base_model": "md_0000000000000001",
            "model": "md_0000000000000002"}
    assert "extract takes" in refused(api, base | {"adapter": adapter_id})["message"]
    assert "extract takes" in refused(api, {k: v for k, v in base.items() if k != "model"})["message"]
    assert "two different models" in refused(api, base | {"model": base["base_model"]})["message"]
    assert "budget_params" in refused(api, base | {"output": {"budget_params": 10**6}})["message"]
    assert "target_modules" in refused(api, base | {"params": {"target_modules": []}})["message"]


def test_a_budget_smaller_than_one_rank_one_module_is_refused(api, adapter_id):
    # the adapter wraps q_proj and v_proj of a hidden-32 Llama: one rank step costs 32 + 32 = 64 parameters
    error = refused(api, job(adapter_id, output={"budget_params": 63}))
    assert error["code"] == "budget_too_small" and "64 parameters" in error["message"]
    error = refused(api, job(adapter_id, output={"budget_bytes": 255}))  # float32: 64 × 4 bytes
    assert error["code"] == "budget_too_small" and "256 bytes" in error["message"]
    assert api.post("/v1/jobs", json=job(adapter_id, output={"budget_params": 64})).status_code == 202
    assert api.post("/v1/jobs", json=job(adapter_id, output={"budget_bytes": 256})).status_code == 202


def test_another_tenants_adapter_or_models_are_not_found(api, adapter_id, tmp_path):
    model = upload_model_dir(api, save_llama(tmp_path / "base"))
    before = stored(api)
    other_model = model[:-1] + ("1" if model.endswith("0") else "0")  # a different id (one ending in 0 was this one)
    extract = {"type": "compress", "method": "extract", "base_model": model, "model": other_model}
    for body in (job(adapter_id), extract):
        response = api.post("/v1/jobs", json=body, headers=api.other)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", response.text
    assert stored(api) == before


def test_models_of_different_shapes_or_architectures_are_refused(api, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from tests.factories import TINY_LLAMA

    base = upload_model_dir(api, save_llama(tmp_path / "base"))
    wider = upload_model_dir(api, save_llama(tmp_path / "wide", intermediate_size=64))
    MistralForCausalLM(MistralConfig(**TINY_LLAMA)).save_pretrained(tmp_path / "mistral")  # the same shapes
    mistral = upload_model_dir(api, tmp_path / "mistral")
    body = {"type": "compress", "method": "extract", "base_model": base}
    error = refused(api, body | {"model": wider})
    assert error["code"] == "incompatible_models" and "mlp" in error["message"] and "[32, 64]" in error["message"]
    error = refused(api, body | {"model": mistral})
    assert error["code"] == "incompatible_models" and "MistralForCausalLM" in error["message"]
    same = upload_model_dir(api, save_llama(tmp_path / "same"))
    assert api.post("/v1/jobs", json=body | {"model": same}).status_code == 202
