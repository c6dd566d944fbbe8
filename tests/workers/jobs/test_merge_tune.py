"""A merge job with `tune` in-process (real redis-server, moto S3, no Celery): a tiny BERT classifier, two
LoRA adapters, validation rows per task; the report holds the whole table and the chosen point; admission
refuses a validation dataset the model cannot use."""

from __future__ import annotations

import pytest
import torch

from tests.app.test_api import upload
from tests.workers.jobs.test_run import run_in_process
from tests.workers.test_unlearning_pipeline import bert_dir, upload_model, upload_rows
from workers.jobs.outputs import report_key


def bert_adapter(directory, base, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(base)
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(directory)
    return directory


def test_a_tuned_merge_reports_the_table_and_merges_at_the_best_point(api, tmp_path) -> None:  # noqa: F811
    base = bert_dir(tmp_path)
    model = upload_model(api, base)
    ids = []
    for seed in (1, 2):
        response = upload(api, bert_adapter(tmp_path / f"a{seed}", base, seed), f"a{seed}")
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    rows = [{"text": f"{a} {b}", "label": i % 2} for i, (a, b) in
            enumerate([("good", "movie"), ("bad", "book"), ("fine", "book"), ("awful", "movie")])]
    data = [upload_rows(api, rows), upload_rows(api, rows[::-1])]
    body = {
        "type": "merge", "adapters": [{"id": i} for i in ids], "method": "ties", "params": {"density": 0.5},
        "output": {"rank": 2},
        "tune": {"model": model["id"], "validation": [{"adapter": t, "dataset": data[t]} for t in range(2)],
                 "search": {"lambda": [0.5, 1.0], "density": [0.3, 1.0]}, "objective": "worst"},
    }
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = run_in_process(api, response.json()["id"])
    assert job.state == "succeeded", job.error
    report = api.app.state.records.storage.get_json(report_key(job))
    tune = report["tune"]
    assert len(tune["table"]) == 4 and tune["objective"] == "worst"
    values = [row["objective"] for row in tune["table"]]
    assert tune["best"] == values.index(max(values))
    for row in tune["table"]:
        assert [t["task"] for t in row["tasks"]] == [0, 1]
        assert row["objective"] == pytest.approx(min(t["normalised"] for t in row["tasks"]))
    chosen = tune["best_point"]
    assert report["params"]["lambda"] == chosen["lambda"] and report["params"]["density"] == chosen["density"]


def test_admission_refuses_lm_rows_for_a_classifier(api, tmp_path) -> None:  # noqa: F811
    base = bert_dir(tmp_path)
    model = upload_model(api, base)
    response = upload(api, bert_adapter(tmp_path / "a", base, 1), "a")
    adapter = response.json()["id"]
    data = api.post("/v1/datasets", files={"file": ("rows.jsonl", b'{"prompt": "a", "completion": "b"}\n')})
    assert data.status_code == 201, data.text
    body = {"type": "merge", "adapters": [{"id": adapter}], "method": "task_arithmetic",
            "tune": {"model": model["id"], "validation": [{"adapter": 0, "dataset": data.json()["id"]}],
                     "search": {"lambda": [0.5, 1.0]}}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "incompatible_inputs"
