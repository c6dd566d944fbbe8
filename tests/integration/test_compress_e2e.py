"""Upload -> compress -> poll -> download (PEFT and compact) -> peft loads the result, through real Redis, S3
(SeaweedFS) and a Celery worker."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from tests.factories import tiny_llama
from tests.integration.conftest import upload_dir, wait_for_job
from tests.integration.test_merge_e2e import download

pytestmark = pytest.mark.integration


def test_sparsify_quantize_end_to_end(client, adapter_dir, tmp_path):
    source = adapter_dir("in", seed=1, r=8, alpha=16)
    adapter_id = upload_dir(client, source)["id"]
    body = {"type": "compress", "adapter": adapter_id, "method": "sparsify_quantize",
            "params": {"density": 0.5, "bits": "int8"}, "output": {"name": "small"}}
    job = client.post("/v1/jobs", json=body).json()
    done = wait_for_job(client, job["id"])
    assert done["state"] == "succeeded", done
    summary = done["result"]["report"]
    assert 0 < summary["rel_error"] < 1 and summary["ratio"] > 2 and summary["compact_file_bytes"] > 0
    out_id = done["result"]["adapter_id"]
    assert client.get(f"/v1/adapters/{out_id}").json()["source_job_id"] == job["id"]
    compact = client.get(f"/v1/adapters/{out_id}/files/adapter_model.safetensors?format=compact")
    assert compact.status_code == 200 and len(compact.content) == summary["compact_file_bytes"]
    local = download(client, out_id, tmp_path / "out")
    model = PeftModel.from_pretrained(tiny_llama(0), local)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 64, (1, 8))).logits).all()
