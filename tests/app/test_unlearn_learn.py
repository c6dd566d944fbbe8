"""Continual learn-and-unlearn jobs at the door (issue 17): `learn` rows are validated like forget and retain
rows — the dataset exists and is this tenant's, row ids exist (422 naming the first that does not), their kind
fits the model, their count is bounded — and only `ug_clu` takes them, while `ug_clu` needs them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from safetensors.numpy import save as save_numpy

from app.main import create_app
from app.schemas.jobs import MAX_LEARN_ROWS, UnlearnJobCreate
from app.settings import Settings
from tests.app.test_models_datasets import CLASSIFIER_CONFIG, jsonl, make_tar, model_files, post_dataset, post_tar
from tests.conftest import tenant_keys


@pytest.fixture
def clients(redis_url, redis_client, moto_s3) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The API signed in as tenant A, and tenant B's headers."""
    key_a, key_b, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        yield client, {"Authorization": f"Bearer {key_b}"}


def images(client, rows: int = 4, labels: int = 3, headers: dict | None = None) -> str:
    tensors = {"pixel_values": np.zeros((rows, 1, 2, 2), np.float32), "labels": np.arange(rows, dtype=np.int64) % 3}
    response = client.post("/v1/datasets", files={"file": ("x.safetensors", save_numpy(tensors))},
                           data={"num_labels": str(labels)}, headers=headers or {})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def job(clients) -> dict:
    client, _ = clients
    vit = post_tar(client, make_tar(model_files(CLASSIFIER_CONFIG))).json()["id"]
    data = images(client)
    return {"type": "unlearn", "model": vit, "forget": {"dataset": data, "rows": [0]}, "retain": data,
            "learn": {"dataset": images(client), "rows": [3, 1]}, "method": "ug_clu", "params": {"steps": 2}}


def test_a_continual_job_is_admitted_and_its_learn_rows_are_in_use(clients, job):
    client, _ = clients
    response = client.post("/v1/jobs", json=job)
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert spec["learn"] == {"dataset": job["learn"]["dataset"], "rows": [1, 3]}  # sorted, like forget rows
    assert spec["params"]["learn_weight"] == 1.0 and spec["params"]["k"] == 5  # UgCluParams' defaults
    refused = client.delete(f"/v1/datasets/{job['learn']['dataset']}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dataset_in_use", refused.text
    everything = client.post("/v1/jobs", json=job | {"learn": {"dataset": job["learn"]["dataset"]}})
    assert everything.status_code == 202, everything.text  # rows null: every row of the dataset


def bad_changes(client, job, other_tenant) -> dict[str, tuple[dict, int, str, str]]:
    learn = job["learn"]["dataset"]
    text = post_dataset(client, jsonl([{"text": "x", "label": 0}] * 2), num_labels=3).json()["id"]
    wide = images(client, labels=5)
    theirs = images(client, headers=other_tenant)
    llama = post_tar(client, make_tar(model_files())).json()["id"]
    lm_rows = post_dataset(client, jsonl([{"prompt": "p", "completion": "c"}] * 2)).json()["id"]
    return {
        "learn-with-sfron": ({"method": "sfron", "params": {}}, 422, "validation_error", "taken only by ug_clu"),
        "ug_clu-without-learn": ({"learn": None}, 422, "missing_input", "ug_clu needs learn"),
        "row-past-the-end": ({"learn": {"dataset": learn, "rows": [1, 4, 9]}}, 422, "invalid_rows", "learn row 4 "),
        "negative-row": ({"learn": {"dataset": learn, "rows": [-1]}}, 422, "validation_error", "non-negative"),
        "unknown-dataset": ({"learn": {"dataset": "ds_0123456789abcdef01"}}, 404, "not_found", ""),
        "other-tenants-dataset": ({"learn": {"dataset": theirs}}, 404, "not_found", ""),
        "text-rows-for-a-vit": ({"learn": {"dataset": text}}, 422, "incompatible_inputs", text),
        "more-labels-than-the-model": ({"learn": {"dataset": wide}}, 422, "incompatible_inputs", "5 labels"),
        "ug_clu-on-a-language-model": ({"model": llama, "forget": {"dataset": lm_rows}, "retain": lm_rows,
                                        "learn": {"dataset": lm_rows}}, 422, "unsupported_family", "ug_clu"),
        "params-bounds": ({"params": {"learn_weight": -1}}, 422, "validation_error", "learn_weight"),
        "learn-target-bounds": ({"goal": {"learn_accuracy": 101}}, 422, "validation_error", "learn_accuracy"),
    }


def test_bad_continual_jobs_are_refused_at_submission(clients, job):
    client, other_tenant = clients
    for name, (change, status, code, words) in bad_changes(client, job, other_tenant).items():
        response = client.post("/v1/jobs", json=job | change)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == code and words in error["message"], (name, error)
    assert client.get("/v1/jobs").json()["items"] == []


def test_learn_rows_are_bounded_in_number():
    body = {"type": "unlearn", "model": "md_0123456789abcdef01", "forget": {"dataset": "ds_0123456789abcdef01"},
            "method": "ug_clu", "learn": {"dataset": "ds_0123456789abcdef01", "rows": list(range(MAX_LEARN_ROWS))}}
    assert UnlearnJobCreate.model_validate(body).learn is not None
    body["learn"]["rows"] = list(range(MAX_LEARN_ROWS + 1))
    with pytest.raises(ValidationError, match="at most 100000"):
        UnlearnJobCreate.model_validate(body)
