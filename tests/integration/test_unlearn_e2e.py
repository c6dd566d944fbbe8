"""Register a tiny model -> upload forget/retain data -> unlearn -> poll -> report, signed audit, and the output
loads (peft adapter / transformers model), through real Redis, S3 and a Celery worker."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import save as save_numpy
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, PreTrainedTokenizerFast

from tests.factories import tiny_llama
from tests.integration.conftest import wait_for_job

pytestmark = pytest.mark.integration

PEOPLE = [f"person{i}" for i in range(6)]
VALUES = [f"value{i}" for i in range(6)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<bos>", "<eos>", "<unk>", *PEOPLE, *VALUES, "city", "?", "lives", "in"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tar_directory(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=f"{directory.name}/{path.name}")
    return buffer.getvalue()


def register(client, directory: Path, name: str) -> dict:
    response = client.post("/v1/models", files={"archive": ("model.tar.gz", tar_directory(directory))},
                           data={"name": name})
    assert response.status_code == 201, response.text
    return response.json()


def upload_rows(client, rows: list[dict], name: str, num_labels: int | None = None) -> dict:
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    form = {"name": name} | ({"num_labels": str(num_labels)} if num_labels else {})
    response = client.post("/v1/datasets", files={"file": (f"{name}.jsonl", data)}, data=form)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def tiny_lm_dir(tmp_path) -> Path:
    directory = tmp_path / "tiny-lm"
    model = tiny_llama(0, vocab_size=32)
    model.save_pretrained(directory, safe_serialization=True)
    word_tokenizer().save_pretrained(directory)
    return directory


def download(client, path: str) -> bytes:
    response = client.get(path)
    assert response.status_code == 200, response.text
    return response.content


def test_grad_diff_through_a_fresh_lora_end_to_end(client, tiny_lm_dir, tmp_path):
    model = register(client, tiny_lm_dir, "tiny-lm")
    assert model["family"] == "causal_lm" and model["has_tokenizer"]
    rng = random.Random(0)
    facts = [{"prompt": f"{who} city ?", "completion": rng.choice(VALUES)} for who in PEOPLE]
    forget = upload_rows(client, facts, "facts")
    retain = upload_rows(client, [{"text": f"{who} lives in {rng.choice(VALUES)}"} for who in PEOPLE], "keep")
    body = {
        "type": "unlearn",
        "model": model["id"],
        "adapter": None,
        "forget": {"dataset": forget["id"], "rows": [0, 1]},
        "retain": retain["id"],
        "eval": None,
        "method": "grad_diff",
        "params": {"steps": 6, "lr": 0.01, "batch_size": 2, "seed": 3},
        "output": "adapter",
    }
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    done = wait_for_job(client, job.json()["id"], timeout=240)
    assert done["state"] == "succeeded", done
    result = done["result"]
    summary = result["report"]
    assert summary["method"] == "grad_diff" and summary["forget_rows"] == 2 and summary["steps"] == 6
    assert summary["after"]["forget_nll"] > summary["before"]["forget_nll"]  # the forget loss rose
    report = client.get(f"/v1/jobs/{done['id']}/report").json()
    assert report["before"] == summary["before"] and report["peft"] is True

    audit = client.get(f"/v1/jobs/{done['id']}/audit").json()
    assert audit["signature_valid"] is True
    manifest = client.get(f"/v1/datasets/{forget['id']}/manifest").json()
    assert audit["forget"] == {
        "dataset_id": forget["id"], "dataset_sha256": forget["sha256"], "row_ids": [0, 1],
        "row_sha256": manifest["row_sha256"][:2],
    }
    assert "facts" not in json.dumps(audit["forget"]) and facts[0]["prompt"] not in json.dumps(audit)
    assert audit["inputs"]["model"] == {"id": model["id"], "sha256": model["sha256"]}
    assert audit["method"] == "grad_diff" and audit["seed"] == 3 and audit["params"]["steps"] == 6
    assert set(audit["versions"]) == {"torch", "transformers", "peft", "amend"}
    adapter = client.get(f"/v1/adapters/{result['adapter_id']}").json()
    assert adapter["source_job_id"] == done["id"] and audit["output"]["sha256"] == adapter["sha256"]

    local = tmp_path / "unlearned"
    local.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (local / name).write_bytes(download(client, f"/v1/adapters/{result['adapter_id']}/files/{name}"))
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, use_safetensors=True)
    peft_model = PeftModel.from_pretrained(base, local)
    tokens = torch.randint(0, 32, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        changed = peft_model(tokens).logits
        original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, use_safetensors=True)(tokens).logits
    assert not torch.allclose(changed, original, atol=1e-5)  # the adapter carries the change

    # the audit is checked on every read: a changed record no longer verifies
    key = audit["report_key"].replace("report.json", "audit.json")
    stored = client.app.state.records.storage.get_json(key)
    stored["forget"]["row_ids"] = [0]
    client.app.state.records.storage.put_json(key, stored)
    assert client.get(f"/v1/jobs/{done['id']}/audit").json()["signature_valid"] is False

    # a second run through the output adapter trains that adapter and yields another new adapter
    again = client.post("/v1/jobs", json=body | {"adapter": result["adapter_id"], "params": {"steps": 2}}).json()
    second = wait_for_job(client, again["id"], timeout=240)
    assert second["state"] == "succeeded", second
    assert second["result"]["adapter_id"] not in (None, result["adapter_id"])
    chained = client.get(f"/v1/jobs/{second['id']}/audit").json()
    assert chained["inputs"]["adapter"] == {"id": adapter["id"], "sha256": adapter["sha256"]}


def test_image_classifier_full_weights_end_to_end(client, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    directory = tmp_path / "tiny-vit"
    ViTForImageClassification(config).save_pretrained(directory, safe_serialization=True)
    model = register(client, directory, "tiny-vit")
    assert model["family"] == "classifier" and model["num_labels"] == 3

    generator = np.random.default_rng(0)

    def images(count: int, label_of) -> bytes:
        labels = np.array([label_of(i) for i in range(count)], np.int64)
        pixels = generator.normal(size=(count, 1, 8, 8)).astype(np.float32) + labels[:, None, None, None]
        return save_numpy({"pixel_values": pixels, "labels": labels})

    datasets = {}
    for name, data in (("forget", images(6, lambda i: 0)), ("retain", images(12, lambda i: 1 + i % 2)),
                       ("test", images(9, lambda i: i % 3))):
        response = client.post("/v1/datasets", files={"file": (f"{name}.safetensors", data)},
                               data={"name": name, "num_labels": "3"})
        assert response.status_code == 201, response.text
        datasets[name] = response.json()["id"]
    body = {
        "type": "unlearn", "model": model["id"], "forget": {"dataset": datasets["forget"]},
        "retain": datasets["retain"], "eval": datasets["test"], "method": "random_label",
        "params": {"steps": 4, "lr": 0.01, "batch_size": 4}, "output": "weights", "name": "vit-forgot-0",
    }
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    done = wait_for_job(client, job.json()["id"], timeout=240)
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert result["adapter_id"] is None and result["model_id"] == "md_" + done["id"].split("_", 1)[1]
    assert {"forget_accuracy", "retain_accuracy", "test_accuracy"} <= set(result["report"]["after"])
    new_model = client.get(f"/v1/models/{result['model_id']}").json()
    assert new_model["source"] == "job" and new_model["source_job_id"] == done["id"]
    assert new_model["name"] == "vit-forgot-0" and new_model["sha256"] != model["sha256"]
    audit = client.get(f"/v1/jobs/{done['id']}/audit").json()
    assert audit["signature_valid"] is True and audit["output"] == {
        "kind": "weights", "id": new_model["id"], "sha256": new_model["sha256"]}
    assert audit["forget"]["row_ids"] == list(range(6))

    local = tmp_path / "downloaded"
    local.mkdir()
    for item in new_model["files"]:
        (local / item["name"]).write_bytes(download(client, f"/v1/models/{new_model['id']}/files/{item['name']}"))
    loaded = AutoModelForImageClassification.from_pretrained(local, use_safetensors=True)
    assert loaded.config.num_labels == 3
