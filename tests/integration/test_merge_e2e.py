"""Upload -> merge -> poll -> download -> peft loads the result, through real Redis, S3 and a Celery worker."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tests.factories import tiny_llama
from tests.integration.conftest import upload_dir, wait_for_job

pytestmark = pytest.mark.integration


def dense_merge_model(adapters: list[tuple[object, float]], **model_overrides):
    """The reference: base weights plus Σ w_t·s_t·B_t·A_t, written plainly (the tiny Llama built with
    `model_overrides`)."""
    model = tiny_llama(0, **model_overrides)
    modules = dict(model.named_modules())
    for directory, weight in adapters:
        config = json.loads((directory / "adapter_config.json").read_text())
        scaling = config["lora_alpha"] / config["r"]
        tensors = load_file(directory / "adapter_model.safetensors")
        for name, lora_a in tensors.items():
            if ".lora_A." not in name:
                continue
            lora_b = tensors[name.replace(".lora_A.", ".lora_B.")]
            module = modules[name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")]
            with torch.no_grad():
                module.weight += weight * scaling * lora_b @ lora_a
    return model


def download(client, adapter_id: str, into):
    into.mkdir()
    for filename in ("adapter_config.json", "adapter_model.safetensors"):
        response = client.get(f"/v1/adapters/{adapter_id}/files/{filename}")
        assert response.status_code == 200
        (into / filename).write_bytes(response.content)
    return into


@pytest.mark.parametrize("method, rank", [("cat", None), ("task_arithmetic", 8)])
def test_merge_end_to_end_loads_in_peft_and_matches_dense(client, adapter_dir, tmp_path, method, rank):
    first = adapter_dir("one", seed=1, r=4, alpha=8)
    second = adapter_dir("two", seed=2, r=4, alpha=16, targets=("q_proj", "v_proj", "o_proj"))
    ids = [upload_dir(client, first)["id"], upload_dir(client, second)["id"]]
    body = {
        "type": "merge",
        "adapters": [{"id": ids[0], "weight": 0.7}, {"id": ids[1], "weight": -0.4}],
        "method": method,
        "params": {},
        "output": {"name": "merged"} | ({"rank": rank} if rank else {}),
    }
    job = client.post("/v1/jobs", json=body).json()
    done = wait_for_job(client, job["id"])
    assert done["state"] == "succeeded", done
    assert done["progress"] == 1.0 and done["attempts"] == 1 and done["finished_at"]
    merged_id = done["result"]["adapter_id"]
    merged = client.get(f"/v1/adapters/{merged_id}").json()
    assert merged["source_job_id"] == job["id"]
    assert set(merged["target_modules"]) == {"q_proj", "v_proj", "o_proj"}
    report = client.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 200 and report.json()

    local = download(client, merged_id, tmp_path / "merged")
    peft_model = PeftModel.from_pretrained(tiny_llama(0), local)
    reference = dense_merge_model([(first, 0.7), (second, -0.4)])
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = peft_model(tokens).logits
        want = reference(tokens).logits
        base = tiny_llama(0)(tokens).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the merge really changes the model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_ties_merge_respects_output_rank(client, adapter_dir):
    ids = [upload_dir(client, adapter_dir(name, seed=seed))["id"] for name, seed in (("one", 1), ("two", 2))]
    body = {"type": "merge", "adapters": [{"id": i} for i in ids], "method": "ties",
            "params": {"density": 0.5}, "output": {"rank": 2}}
    done = wait_for_job(client, client.post("/v1/jobs", json=body).json()["id"])
    assert done["state"] == "succeeded", done
    assert client.get(f"/v1/adapters/{done['result']['adapter_id']}").json()["rank"] <= 2


def test_incompatible_shapes_fail_with_invalid_input(client, adapter_dir):
    small = adapter_dir("small", seed=1)
    wide = adapter_dir("wide", seed=2, hidden_size=48, intermediate_size=64)
    ids = [upload_dir(client, small)["id"], upload_dir(client, wide)["id"]]
    body = {"type": "merge", "adapters": [{"id": i} for i in ids], "method": "task_arithmetic"}
    done = wait_for_job(client, client.post("/v1/jobs", json=body).json()["id"])
    assert done["state"] == "failed"
    assert done["error"]["code"] == "invalid_input"
    assert "q_proj" in done["error"]["message"]
    assert done["result"] is None


def test_a_merge_job_streaming_its_inputs_stores_what_the_files_merge_writes(client, adapter_dir, tmp_path):
    """The worker streams the inputs from S3 into the merge (workers/jobs/streamed_inputs.py); the adapter it
    stores is the one `merge_adapter_files` writes from the same files on disk."""
    from app.schemas.merge import MergeOutput
    from workers.formats.lora import merge_adapter_files
    from workers.jobs.merge import torch_threads

    directories = [adapter_dir(f"s{seed}", seed=seed, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
                   for seed in (1, 2, 3)]
    ids = [upload_dir(client, directory)["id"] for directory in directories]
    weights = [0.7, -0.4, 1.0]
    output = {"name": "streamed", "rank": 4}
    body = {"type": "merge", "adapters": [{"id": i, "weight": w} for i, w in zip(ids, weights, strict=True)],
            "method": "ties", "params": {"density": 0.5}, "output": output}
    done = wait_for_job(client, client.post("/v1/jobs", json=body).json()["id"])
    assert done["state"] == "succeeded", done
    stored = download(client, done["result"]["adapter_id"], tmp_path / "stored")

    inputs = [(json.loads((d / "adapter_config.json").read_text()), d / "adapter_model.safetensors", w)
              for d, w in zip(directories, weights, strict=True)]
    with torch_threads(1):  # as the worker merges (AMEND_MERGE_THREADS=1)
        merge_adapter_files(inputs, "ties", {"density": 0.5}, MergeOutput.model_validate(output).model_dump(),
                            tmp_path / "files")
    assert json.loads((stored / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "files" / "adapter_config.json").read_text())
    # same bytes in, same math on one thread: the same bytes out
    assert (stored / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "files" / "adapter_model.safetensors").read_bytes()


def test_a_merge_input_changed_in_storage_fails_as_corrupted_and_stores_nothing(client, adapter_dir):
    from app.storage import keys
    from workers.jobs.outputs import output_adapter_id

    ids = [upload_dir(client, adapter_dir(f"c{seed}", seed=seed, r=4))["id"] for seed in (1, 2)]
    records = client.app.state.records
    weights_name = f"/adapters/{ids[1]}/adapter_model.safetensors"
    key = next(k for k in records.storage.list_keys("tenants/") if k.endswith(weights_name))
    tampered = bytearray(records.storage.get_bytes(key))
    tampered[-1] ^= 0x01  # one bit of one weight: still a valid, finite adapter
    records.storage.put_bytes(key, bytes(tampered))
    body = {"type": "merge", "adapters": [{"id": i} for i in ids], "method": "task_arithmetic",
            "output": {"name": "never", "rank": 4}}
    done = wait_for_job(client, client.post("/v1/jobs", json=body).json()["id"])
    assert done["state"] == "failed" and done["error"]["code"] == "input_corrupted", done
    assert ids[1] in done["error"]["message"]
    assert client.get(f"/v1/adapters/{output_adapter_id(done['id'])}").status_code == 404
    tenant = key.split("/")[1]
    assert not list(records.storage.list_keys(keys.adapter(tenant, output_adapter_id(done["id"]))))
    assert not list(records.storage.list_keys(keys.job(tenant, done["id"], "results/")))
