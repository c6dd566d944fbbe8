"""A continual learn-and-unlearn job (`ug_clu`) through the API and the unlearn handler in-process (real
redis-server, moto S3, no Celery), as `test_unlearning_pipeline.py` runs plain unlearning jobs: a tiny BERT text
classifier through a fresh LoRA learns rows of a third label while it forgets others; the signed audit record
lists both sets with their row hashes, and a learn row equal to a forget row is dropped (delete wins)."""

from __future__ import annotations

from app import audit
from tests.workers.test_unlearning_pipeline import bert_dir, context_for, start, upload_model, upload_rows

FORGET = [{"text": "very awful movie", "label": 0}, {"text": "not good book", "label": 0}]
RETAIN = [{"text": f"{a} {b}", "label": i % 2} for i, (a, b) in
          enumerate([("good", "movie"), ("bad", "book"), ("fine", "book"), ("awful", "movie")])]
LEARN = [{"text": "very very book", "label": 2}, {"text": "not very movie", "label": 2}, FORGET[0]]


def test_a_continual_job_stores_an_adapter_and_an_audit_of_what_it_learned_and_forgot(api, tmp_path):
    from workers.jobs.unlearn import existing_result
    from workers.jobs.unlearn import run as run_unlearn_job

    model = upload_model(api, bert_dir(tmp_path, num_labels=3))
    forget = upload_rows(api, FORGET, num_labels=3)
    retain = upload_rows(api, RETAIN, num_labels=3)
    learn = upload_rows(api, LEARN, num_labels=3)
    body = {
        "type": "unlearn", "model": model["id"], "forget": {"dataset": forget, "rows": [0, 1]}, "retain": retain,
        "learn": {"dataset": learn, "rows": [0, 1, 2]}, "method": "ug_clu",
        "params": {"steps": 4, "lr": 0.01, "batch_size": 2}, "output": "adapter",
    }
    job_id = start(api, body)
    context = context_for(api, job_id)
    result = run_unlearn_job(context)
    assert result.adapter_id == "ad_" + job_id.split("_", 1)[1]
    summary = result.report
    assert summary["method"] == "ug_clu" and summary["forget_rows"] == 2 and summary["learn_rows"] == 2
    assert {"learn_accuracy", "learn_loss"} <= set(summary["before"]) and "learn_accuracy" in summary["after"]

    signed = context.records.storage.get_json(result.audit_key)
    assert audit.verify(signed, context.settings.audit_hmac_key.get_secret_value())
    manifests = {d: api.get(f"/v1/datasets/{d}/manifest").json()["row_sha256"] for d in (forget, learn)}
    assert signed["forget"]["dataset_id"] == forget and signed["forget"]["row_ids"] == [0, 1]
    assert signed["forget"]["row_sha256"] == manifests[forget][:2]
    # delete wins: learn row 2 is forget row 0's text and label, so it is dropped and listed
    assert signed["learn"] == {
        "dataset_id": learn,
        "dataset_sha256": api.get(f"/v1/datasets/{learn}").json()["sha256"],
        "row_ids": [0, 1],
        "row_sha256": manifests[learn][:2],
        "dropped_row_ids": [2],
    }
    assert manifests[learn][2] == manifests[forget][0]
    assert signed["output"]["id"] == result.adapter_id and signed["method"] == "ug_clu"
    datasets = [(p["id"], p["role"]) for p in api.get(f"/v1/adapters/{result.adapter_id}").json()["parents"]
                if p["kind"] == "dataset"]
    assert datasets == [(forget, "forget"), (learn, "learn"), (retain, "retain")]  # lineage names what it learned
    # a redelivered copy finds everything stored and does not recompute
    assert existing_result(context) == result
