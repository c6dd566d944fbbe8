"""Models, datasets and unlearn job submission through the HTTP contract (real redis-server, moto S3, no
worker). Model files are built by hand (config.json + a numpy safetensors file): no torch needed here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save as save_numpy

from app.audit import canonical_json
from app.main import create_app
from app.settings import Settings
from tests.conftest import tenant_keys

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 4}
CLASSIFIER_CONFIG = {
    "architectures": ["ViTForImageClassification"],
    "model_type": "vit",
    "id2label": {"0": "a", "1": "b", "2": "c"},
}


@pytest.fixture
def roots(tmp_path) -> Path:
    root = tmp_path / "models-root"
    root.mkdir()
    return root


@pytest.fixture
def api(redis_url, redis_client, moto_s3, roots):
    key_a, key_b, api_keys = tenant_keys()
    settings = Settings(
        environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys, max_upload_bytes=4 * 2**20,
        max_dataset_rows=20, max_model_files=8, max_model_bytes=2 * 2**20, model_roots=[str(roots)],
    )
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        client.other_key = key_b  # type: ignore[attr-defined]
        client.records = client.app.state.records  # type: ignore[attr-defined]
        yield client


def stored_keys(client) -> list[str]:
    return list(client.records.storage.list_keys("tenants/"))


def weights_bytes(nan: bool = False) -> bytes:
    embed = np.arange(64, dtype=np.float32).reshape(16, 4) / 64
    if nan:
        embed[0, 0] = np.nan
    return save_numpy({"model.embed_tokens.weight": embed, "model.position_ids": np.arange(4, dtype=np.int64)})


def model_files(config: dict | None = None, **extra: bytes) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps(config or LLAMA_CONFIG).encode(),
        "model.safetensors": weights_bytes(),
        "tokenizer.json": b'{"version": "1.0"}',
    }
    files.update(extra)
    return files


def make_tar(files: dict[str, bytes], prefix: str = "", gzip: bool = True, tweak=None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if tweak:
            tweak(tar)
    return buffer.getvalue()


def post_tar(client, data: bytes, filename: str = "model.tar.gz", name: str = "tiny"):
    return client.post("/v1/models", files={"archive": (filename, data)}, data={"name": name})


def test_model_upload_get_list_download_delete(api):
    response = post_tar(api, make_tar(model_files(), prefix="tiny-llama/"))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["family"] == "causal_lm" and body["architecture"] == "LlamaForCausalLM" and body["has_tokenizer"]
    assert body["num_labels"] is None and body["source"] == "upload" and body["name"] == "tiny"
    assert {f["name"] for f in body["files"]} == {"config.json", "model.safetensors", "tokenizer.json"}
    weights = next(f for f in body["files"] if f["name"] == "model.safetensors")
    assert weights["sha256"] == hashlib.sha256(weights_bytes()).hexdigest()
    assert api.get(f"/v1/models/{body['id']}").json() == body | {"version_of": body["id"], "version": 1}
    assert [m["id"] for m in api.get("/v1/models").json()["items"]] == [body["id"]]
    assert api.get(f"/v1/models/{body['id']}/files/model.safetensors").content == weights_bytes()
    assert api.get(f"/v1/models/{body['id']}/files/secret.txt").status_code == 404
    other = api.get(f"/v1/models/{body['id']}", headers={"Authorization": f"Bearer {api.other_key}"})
    assert other.status_code == 404
    assert api.delete(f"/v1/models/{body['id']}").status_code == 204
    assert api.get(f"/v1/models/{body['id']}").status_code == 404
    assert stored_keys(api) == []


def test_documentation_beside_the_model_is_skipped_not_stored(api, roots):
    docs = {"README.md": b"# model card", "LICENSE": b"Apache-2.0", "USAGE.md": b"how to"}
    body = post_tar(api, make_tar(model_files(**docs), prefix="snapshot/")).json()
    assert {f["name"] for f in body["files"]} == {"config.json", "model.safetensors", "tokenizer.json"}
    assert not any(key.endswith(tuple(docs)) for key in stored_keys(api))
    directory = write_dir(roots / "hf-snapshot", model_files(**docs))
    response = api.post("/v1/models", json={"path": str(directory)})
    assert response.status_code == 201, response.text
    assert {f["name"] for f in response.json()["files"]} == {"config.json", "model.safetensors", "tokenizer.json"}
    # a pickle checkpoint is still refused, not skipped: nobody should think it was used
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x02}q.")
    assert api.post("/v1/models", json={"path": str(directory)}).status_code == 415


def test_classifier_family_and_labels_from_config(api):
    body = post_tar(api, make_tar(model_files(CLASSIFIER_CONFIG), gzip=False)).json()
    assert body["family"] == "classifier" and body["num_labels"] == 3


def _symlink(tar):
    info = tarfile.TarInfo("evil.safetensors")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _hardlink(tar):
    info = tarfile.TarInfo("hard.safetensors")
    info.type, info.linkname = tarfile.LNKTYPE, "config.json"
    tar.addfile(info)


def _device(tar):
    info = tarfile.TarInfo("dev.safetensors")
    info.type = tarfile.CHRTYPE
    tar.addfile(info)


@pytest.mark.parametrize(
    "archive, status, code, words",
    [
        (make_tar(model_files(**{"pytorch_model.bin": b"\x80\x02}q."})), 415, "unsupported_media_type", "pickle"),
        (make_tar(model_files(), tweak=_symlink), 400, "invalid_model", "link"),
        (make_tar(model_files(), tweak=_hardlink), 400, "invalid_model", "link"),
        (make_tar(model_files(), tweak=_device), 400, "invalid_model", "regular file"),
        (make_tar(model_files(), prefix="../"), 400, "invalid_model", "escapes"),
        (make_tar(model_files(), prefix="a/../../"), 400, "invalid_model", "escapes"),
        (make_tar(model_files(), prefix="/abs/"), 400, "invalid_model", "absolute"),
        (make_tar(model_files(LLAMA_CONFIG | {"auto_map": {"AutoModel": "x.Model"}})), 400, "custom_code",
         "trust_remote_code"),
        (make_tar(model_files(**{"tokenizer_config.json": b'{"auto_map": {"AutoTokenizer": ["t.T", null]}}'})),
         400, "custom_code", "trust_remote_code"),
        (make_tar(model_files(**{"modeling_evil.py": b"import os"})), 400, "custom_code", "code"),
        (make_tar(model_files(**{"notes.exe": b"MZ"})), 400, "invalid_model", "unknown file type"),
        (make_tar(model_files(**{f"shard{i}.safetensors": weights_bytes() for i in range(8)})), 400, "invalid_model",
         "more than 8 files"),
        (make_tar(model_files(**{"huge.safetensors": b"\0" * (2 * 2**20 + 1)})), 413, "payload_too_large",
         "expands"),
        (make_tar(model_files(**{"model.safetensors": weights_bytes(nan=True)})), 400, "invalid_model", "NaN"),
        (make_tar(model_files({"architectures": ["LlamaModel"], "model_type": "llama"})), 400, "invalid_model",
         "not supported"),
        (make_tar({"config.json": json.dumps(LLAMA_CONFIG).encode()}), 400, "invalid_model", "no *.safetensors"),
        (make_tar(model_files(), prefix="a/b/"), 400, "invalid_model", "nested"),
        (b"this is not a tar at all", 400, "invalid_model", "tar"),
    ],
    ids=["pickle", "symlink", "hardlink", "device", "dotdot", "dotdot-inner", "absolute", "auto_map",
         "tokenizer-auto_map", "python", "unknown", "too-many-files", "tar-bomb", "nan", "base-model",
         "no-weights", "nested", "not-tar"],
)
def test_bad_model_archive_is_refused_and_nothing_stored(api, archive, status, code, words):
    response = post_tar(api, archive)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert stored_keys(api) == [] and api.get("/v1/models").json()["items"] == []


def test_a_lone_pickle_upload_is_415(api):
    response = post_tar(api, b"\x80\x02}q.", filename="pytorch_model.bin")
    assert response.status_code == 415


def write_dir(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def test_register_by_path_inside_the_root(api, roots):
    directory = write_dir(roots / "tiny", model_files())
    outside = write_dir(roots.parent / "shared-tokenizer", {"tokenizer.json": b"{}"})
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer.json").symlink_to(roots / "tiny" / "config.json")  # a symlink inside the root is fine
    response = api.post("/v1/models", json={"path": str(directory), "name": "from-disk"})
    assert response.status_code == 201, response.text
    assert response.json()["source"] == "path" and response.json()["name"] == "from-disk"
    assert outside.exists()


@pytest.mark.parametrize("where", ["outside", "escaping-symlink", "dir-symlink", "missing", "relative", "nul"])
def test_register_by_path_outside_the_root_is_refused(api, roots, where):
    outside = write_dir(roots.parent / "elsewhere", model_files())
    if where == "outside":
        path, status = str(outside), 403
    elif where == "escaping-symlink":
        directory = write_dir(roots / "tiny", model_files())
        (directory / "model.safetensors").unlink()
        (directory / "model.safetensors").symlink_to(outside / "model.safetensors")
        path, status = str(directory), 403
    elif where == "dir-symlink":
        os.symlink(outside, roots / "link")
        path, status = str(roots / "link"), 403
    elif where == "missing":
        path, status = str(roots / "nope"), 403
    elif where == "nul":
        path, status = str(roots) + "/a\x00b", 400
    else:
        path, status = "tiny", 400
    response = api.post("/v1/models", json={"path": path})
    assert response.status_code == status, response.text
    assert stored_keys(api) == []


def test_register_by_path_refuses_unknown_body_fields(api, roots):
    response = api.post("/v1/models", json={"path": str(roots), "trust_remote_code": True})
    assert response.status_code == 422


# -- datasets -----------------------------------------------------------------------------------------------


def jsonl(rows: list) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def post_dataset(client, data: bytes, filename: str = "rows.jsonl", num_labels: int | None = None, name="d"):
    form = {"name": name} | ({"num_labels": str(num_labels)} if num_labels is not None else {})
    return client.post("/v1/datasets", files={"file": (filename, data)}, data=form)


def test_lm_dataset_upload_manifest_and_delete(api):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    response = post_dataset(api, jsonl(rows[:2]) + b"\n" + jsonl(rows[2:]))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["kind"] == "lm" and body["format"] == "jsonl" and body["rows"] == 5 and body["num_labels"] is None
    manifest = api.get(f"/v1/datasets/{body['id']}/manifest").json()
    assert manifest["row_sha256"] == [hashlib.sha256(canonical_json(row)).hexdigest() for row in rows]
    assert api.get("/v1/datasets").json()["items"][0]["id"] == body["id"]
    assert api.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert stored_keys(api) == []


def test_text_classification_and_image_datasets(api):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(6)]
    body = post_dataset(api, jsonl(rows), num_labels=3).json()
    assert body["kind"] == "text_classification" and body["num_labels"] == 3 and body["rows"] == 6
    tensors = {"pixel_values": np.zeros((4, 3, 2, 2), np.float32), "labels": np.array([0, 1, 2, 1], np.int64)}
    response = post_dataset(api, save_numpy(tensors), filename="images.safetensors", num_labels=3)
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == "image_classification" and response.json()["rows"] == 4
    manifest = api.get(f"/v1/datasets/{response.json()['id']}/manifest").json()
    assert len(set(manifest["row_sha256"])) == 3  # rows 1 and 3 are identical


@pytest.mark.parametrize(
    "data, filename, num_labels, status, words",
    [
        (b'{"text": "a"}\n{"text": "b"\n', "rows.jsonl", None, 400, "line 2 is not valid JSON"),
        (b'{"text": "a"}\n[1, 2]\n', "rows.jsonl", None, 400, "line 2: each line must be a JSON object"),
        (b'{"text": NaN}\n', "rows.jsonl", None, 400, "line 1 is not valid JSON"),
        (jsonl([{"text": "a", "label": 3}]), "rows.jsonl", 3, 400, "label 3 is outside 0..2"),
        (jsonl([{"text": "a", "label": -1}]), "rows.jsonl", 3, 400, "outside"),
        (jsonl([{"text": "a", "label": True}]), "rows.jsonl", 3, 400, "integer"),
        (jsonl([{"text": "a", "label": 1}]), "rows.jsonl", None, 400, "num_labels"),
        (jsonl([{"text": "a"}]), "rows.jsonl", 2, 400, "only for labelled rows"),
        (jsonl([{"text": "a"}, {"prompt": "p", "completion": "c"}]), "rows.jsonl", None, 400, "differ"),
        (jsonl([{"question": "a"}]), "rows.jsonl", None, 400, "expected keys"),
        (jsonl([{"text": 5}]), "rows.jsonl", None, 400, "must be a string"),
        (jsonl([{"text": str(i)} for i in range(21)]), "rows.jsonl", None, 413, "more than 20 rows"),
        (b"{}" + b" " * 70_000 + b"\n", "rows.jsonl", None, 413, "line 1 is longer"),
        (b"\n\n", "rows.jsonl", None, 400, "no rows"),
        (save_numpy({"pixel_values": np.zeros((2, 3), np.float32), "labels": np.array([0, 5])}),
         "x.safetensors", 3, 400, "label 5 is outside"),
        (save_numpy({"pixel_values": np.zeros((2, 3), np.float32), "labels": np.array([0.0, 1.0])}),
         "x.safetensors", 3, 400, "integer"),
        (save_numpy({"pixel_values": np.zeros((2, 3), np.float32), "labels": np.array([0, 1, 1])}),
         "x.safetensors", 3, 400, "rows"),
        (save_numpy({"pixel_values": np.full((2, 3), np.inf, np.float32), "labels": np.array([0, 1])}),
         "x.safetensors", 3, 400, "NaN or infinite"),
        (save_numpy({"pixel_values": np.zeros((25, 3), np.float32), "labels": np.zeros(25, np.int64)}),
         "x.safetensors", 3, 413, "more than 20 rows"),
        (b"\x80\x02}q.", "rows.pkl", None, 415, "pickle"),
    ],
    ids=["malformed-line", "not-object", "nan", "label-high", "label-negative", "label-bool", "no-num-labels",
         "num-labels-on-lm", "mixed-shapes", "unknown-keys", "non-string", "too-many-rows", "long-line",
         "empty", "tensor-label-range", "float-labels", "row-mismatch", "inf-pixels", "too-many-tensor-rows",
         "pickle"],
)
def test_bad_dataset_is_refused_and_nothing_stored(api, data, filename, num_labels, status, words):
    response = post_dataset(api, data, filename, num_labels)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"], response.json()
    assert stored_keys(api) == []


# -- unlearn job submission -----------------------------------------------------------------------------------


@pytest.fixture
def lm_inputs(api):
    model = post_tar(api, make_tar(model_files())).json()["id"]
    forget = post_dataset(api, jsonl([{"prompt": "who", "completion": "me"}] * 3)).json()["id"]
    retain = post_dataset(api, jsonl([{"text": "keep this"}] * 3)).json()["id"]
    return {"model": model, "forget": forget, "retain": retain}


def unlearn_body(inputs: dict, **changes) -> dict:
    body = {
        "type": "unlearn",
        "model": inputs["model"],
        "forget": {"dataset": inputs["forget"], "rows": None},
        "retain": inputs["retain"],
        "method": "grad_diff",
        "params": {"steps": 2},
        "output": "adapter",
    }
    return body | changes


def test_unlearn_job_is_accepted_and_its_inputs_are_in_use(api, lm_inputs):
    forget = {"dataset": lm_inputs["forget"], "rows": [2, 0]}
    response = api.post("/v1/jobs", json=unlearn_body(lm_inputs, forget=forget))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["type"] == "unlearn" and job["method"] == "grad_diff"
    assert job["spec"]["forget"]["rows"] == [0, 2] and job["spec"]["params"]["steps"] == 2
    assert job["spec"]["params"]["alpha"] == 1.0  # defaults filled in from GradDiffParams
    for path in (f"/v1/models/{lm_inputs['model']}", f"/v1/datasets/{lm_inputs['forget']}",
                 f"/v1/datasets/{lm_inputs['retain']}"):
        refused = api.delete(path)
        assert refused.status_code == 409 and refused.json()["error"]["code"].endswith("_in_use"), refused.text
    assert api.get(f"/v1/jobs/{job['id']}/audit").status_code == 404
    api.post(f"/v1/jobs/{job['id']}/cancel")
    assert api.delete(f"/v1/datasets/{lm_inputs['retain']}").status_code == 204


@pytest.mark.parametrize(
    "changes, status, code",
    [
        ({"retain": None}, 422, "missing_input"),
        ({"retain": None, "method": "grad_ascent", "params": {"gu": True}}, 422, "missing_input"),
        ({"retain": None, "method": "grad_ascent", "reference": "retrain"}, 422, "missing_input"),
        ({"method": "finetune", "params": {}}, 422, "unsupported_family"),
        ({"method": "ssd", "params": {}}, 422, "unsupported_family"),
        ({"method": "natmu", "params": {}}, 422, "unsupported_family"),
        ({"retain": None, "method": "mu_mis", "params": {}}, 422, "unsupported_family"),
        ({"method": "muso", "params": {}}, 422, "unsupported_family"),
        ({"method": "natmu", "params": {"delta": 2.0}}, 422, "validation_error"),
        ({"params": {"steps": 0}}, 422, "validation_error"),
        ({"params": {"unknown": 1}}, 422, "validation_error"),
        ({"method": "nope"}, 422, "validation_error"),
        ({"output": "weights", "adapter": "ad_0123456789abcdef01"}, 422, "validation_error"),
        ({"model": "md_0123456789abcdef01"}, 404, "not_found"),
        ({"retain": "ds_0123456789abcdef01"}, 404, "not_found"),
        ({"adapter": "ad_0123456789abcdef01"}, 404, "not_found"),
        ({"surprise": 1}, 422, "validation_error"),
    ],
    ids=["no-retain", "gu-needs-retain", "reference-needs-retain", "finetune-on-lm", "ssd-on-lm", "natmu-on-lm",
         "mu_mis-on-lm", "muso-on-lm", "natmu-params-bounds", "params-bounds",
         "params-unknown", "method", "weights-with-adapter", "unknown-model", "unknown-dataset", "unknown-adapter",
         "extra-key"],
)
def test_bad_unlearn_jobs_are_refused_at_submission(api, lm_inputs, changes, status, code):
    response = api.post("/v1/jobs", json=unlearn_body(lm_inputs, **changes))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert api.get("/v1/jobs").json()["items"] == []


def test_forget_rows_must_exist_and_datasets_fit_the_model(api, lm_inputs):
    response = api.post("/v1/jobs", json=unlearn_body(lm_inputs, forget={"dataset": lm_inputs["forget"], "rows": [3]}))
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_rows"
    labelled = post_dataset(api, jsonl([{"text": "x", "label": 0}]), num_labels=2).json()["id"]
    response = api.post("/v1/jobs", json=unlearn_body(lm_inputs, retain=labelled))
    assert response.status_code == 422 and response.json()["error"]["code"] == "incompatible_inputs"


def test_reindex_rebuilds_models_and_datasets(api, lm_inputs):
    api.records.index.flushdb()
    counts = api.records.reindex()
    assert counts["models"] == 1 and counts["datasets"] == 2
    assert api.get(f"/v1/models/{lm_inputs['model']}").status_code == 200
    assert len(api.get("/v1/datasets").json()["items"]) == 2


def test_an_adapter_under_unlearning_cannot_be_deleted(api, lm_inputs, adapter_dir):
    directory = adapter_dir()
    adapter = api.post(
        "/v1/adapters",
        files={
            "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes()),
        },
    ).json()["id"]
    job = api.post("/v1/jobs", json=unlearn_body(lm_inputs, adapter=adapter))
    assert job.status_code == 202, job.text
    refused = api.delete(f"/v1/adapters/{adapter}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_in_use"


def test_archive_made_with_tar_dot_and_hidden_files_is_accepted(api, tmp_path):
    directory = write_dir(tmp_path / "made-by-tar", model_files() | {".DS_Store": b"\0\1", "._config.json": b"x"})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname=".")  # like `tar -czf model.tgz -C dir .`: ./config.json, ...
    response = post_tar(api, buffer.getvalue())
    assert response.status_code == 201, response.text
    assert {f["name"] for f in response.json()["files"]} == {"config.json", "model.safetensors", "tokenizer.json"}


def test_image_classifier_refuses_text_rows_and_text_classifier_refuses_images(api):
    vit = post_tar(api, make_tar(model_files(CLASSIFIER_CONFIG))).json()["id"]
    text = post_dataset(api, jsonl([{"text": "x", "label": 0}] * 2), num_labels=3).json()["id"]
    body = {"type": "unlearn", "model": vit, "forget": {"dataset": text}, "retain": text, "method": "random_label"}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422 and response.json()["error"]["code"] == "incompatible_inputs", response.text
    bert_config = {"architectures": ["BertForSequenceClassification"], "model_type": "bert", "num_labels": 3}
    bert = post_tar(api, make_tar(model_files(bert_config))).json()["id"]
    tensors = {"pixel_values": np.zeros((2, 1, 2, 2), np.float32), "labels": np.array([0, 1], np.int64)}
    images = post_dataset(api, save_numpy(tensors), filename="x.safetensors", num_labels=3).json()["id"]
    response = api.post("/v1/jobs", json=body | {"model": bert, "forget": {"dataset": images}, "retain": images})
    assert response.status_code == 422 and response.json()["error"]["code"] == "incompatible_inputs", response.text
    assert api.post("/v1/jobs", json=body | {"model": bert}).status_code == 202


def test_founding_classifier_methods_are_admitted_with_their_inputs(api):
    """natmu/muso need forget and retain rows, mu_mis only forget rows (issue 17)."""
    vit = post_tar(api, make_tar(model_files(CLASSIFIER_CONFIG))).json()["id"]
    tensors = {"pixel_values": np.zeros((4, 1, 2, 2), np.float32), "labels": np.array([0, 1, 2, 0], np.int64)}
    images = post_dataset(api, save_numpy(tensors), filename="x.safetensors", num_labels=3).json()["id"]
    body = {"type": "unlearn", "model": vit, "forget": {"dataset": images, "rows": [0]}, "params": {"steps": 2}}
    accepted = api.post("/v1/jobs", json=body | {"method": "mu_mis"})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["spec"]["params"]["optimizer"] == "sgd"  # MuMisParams' default filled in
    for method in ("natmu", "muso"):
        refused = api.post("/v1/jobs", json=body | {"method": method})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "missing_input", refused.text
        accepted = api.post("/v1/jobs", json=body | {"method": method, "retain": images})
        assert accepted.status_code == 202, accepted.text
