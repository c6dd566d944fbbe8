"""The unlearn handler in-process (real redis-server, moto S3, no Celery): a tiny BERT text classifier through
a fresh LoRA, redelivery without recomputing, cancellation, and models that must not load."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from app import audit
from app.checks.adapter import ALL_DTYPES, read_header
from app.records import add_event, now
from app.schemas.jobs import JobRecord
from workers.jobs.context import InputRejected, JobCancelled, JobContext

WORDS = ["good", "bad", "fine", "awful", "movie", "book", "very", "not"]


def bert_dir(tmp_path, num_labels: int = 2):
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    directory = tmp_path / "tiny-bert"
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def upload_model(client, directory) -> dict:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    response = client.post("/v1/models", files={"archive": ("m.tar", buffer.getvalue())})
    assert response.status_code == 201, response.text
    return response.json()


def upload_rows(client, rows, num_labels=2) -> str:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    response = client.post("/v1/datasets", files={"file": ("rows.jsonl", data)}, data={"num_labels": str(num_labels)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def context_for(client, job_id: str) -> JobContext:
    records = client.app.state.records
    return JobContext(records.get_job(job_id), records, client.app.state.settings, SimpleNamespace(lost=False))


def start(client, body) -> str:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def running(record: JobRecord) -> bool:
        record.state, record.started_at, record.attempts = "running", now(), 1
        add_event(record, "running")
        return True

    client.app.state.records.mutate_job(job_id, running)
    return job_id


@pytest.fixture
def text_job(api, tmp_path):
    model = upload_model(api, bert_dir(tmp_path))
    forget = upload_rows(api, [{"text": "very awful movie", "label": 0}, {"text": "not good book", "label": 0}])
    retain = upload_rows(api, [{"text": f"{a} {b}", "label": i % 2} for i, (a, b) in
                               enumerate([("good", "movie"), ("bad", "book"), ("fine", "book"), ("awful", "movie")])]
                         + [{"text": " ".join(["very"] * 40 + ["good"]), "label": 1}])  # longer than 32 positions
    return {
        "type": "unlearn", "model": model["id"], "forget": {"dataset": forget, "rows": [1]}, "retain": retain,
        "method": "random_label", "params": {"steps": 3, "lr": 0.01, "batch_size": 2}, "output": "adapter",
    }


def test_text_classifier_through_a_fresh_lora_and_redelivery(api, text_job):
    from workers.jobs.unlearn import existing_result
    from workers.jobs.unlearn import run as run_unlearn_job

    job_id = start(api, text_job)
    context = context_for(api, job_id)
    assert existing_result(context) is None
    result = run_unlearn_job(context)
    assert result.adapter_id == "ad_" + job_id.split("_", 1)[1] and result.audit_key and result.report_key
    assert {"forget_accuracy", "retain_accuracy"} <= set(result.report["after"])
    signed = context.records.storage.get_json(result.audit_key)
    assert audit.verify(signed, context.settings.audit_hmac_key.get_secret_value())
    assert signed["forget"]["row_ids"] == [1] and len(signed["forget"]["row_sha256"]) == 1
    adapter = api.get(f"/v1/adapters/{result.adapter_id}").json()
    assert adapter["source_job_id"] == job_id and "classifier" in adapter["target_modules"]
    # a redelivered copy finds everything stored and does not recompute
    assert existing_result(context) == result


def test_the_fresh_lora_is_configurable_and_recorded_in_the_audit(api, text_job):
    from workers.jobs.unlearn import run as run_unlearn_job

    lora = {"r": 4, "alpha": 12, "target_modules": ["query", "value"]}
    job_id = start(api, {**text_job, "lora": lora})
    context = context_for(api, job_id)
    result = run_unlearn_job(context)
    adapter = api.get(f"/v1/adapters/{result.adapter_id}").json()
    assert adapter["rank"] == 4 and adapter["alpha"] == 12
    assert {"query", "value"} <= set(adapter["target_modules"]) and "key" not in adapter["target_modules"]
    signed = context.records.storage.get_json(result.audit_key)
    assert signed["inputs"]["fresh_lora"] == lora and signed["inputs"]["adapter"] is None
    # module names the model does not have: refused as bad input, not a crash
    job_id = start(api, {**text_job, "lora": {"target_modules": ["no_such_module"]}})
    with pytest.raises(InputRejected, match="fresh LoRA does not fit"):
        run_unlearn_job(context_for(api, job_id))


def test_the_fresh_lora_options_are_bounded_and_only_for_a_fresh_adapter(api, text_job):
    bad = [
        {"lora": {"r": 0}},
        {"lora": {"r": 512}},
        {"lora": {"alpha": 0}},
        {"lora": {"target_modules": []}},
        {"lora": {"target_modules": ["a/b"]}},
        {"lora": {"dropout": 0.1}},
        {"lora": {"r": 4}, "output": "weights"},
        {"lora": {"r": 4}, "adapter": "ad_" + "0" * 32},
    ]
    for change in bad:
        response = api.post("/v1/jobs", json={**text_job, **change})
        assert response.status_code == 422, (change, response.text)
        if "output" in change or "adapter" in change:
            assert "'lora' configures the fresh LoRA" in response.text, response.text


def test_a_cancelled_job_stops(api, text_job):
    from workers.jobs.unlearn import run as run_unlearn_job

    job_id = start(api, text_job)
    context = context_for(api, job_id)
    context.records.index.set(context.records.cancel_key(job_id), "1")
    with pytest.raises(JobCancelled):
        run_unlearn_job(context)


def test_a_model_whose_files_changed_in_storage_is_rejected(api, text_job):
    from workers.jobs.unlearn import run as run_unlearn_job

    job_id = start(api, text_job)
    context = context_for(api, job_id)
    record = context.records.get_resource("models", context.job.tenant, text_job["model"])
    key = f"tenants/{record.tenant}/models/{record.id}/files/config.json"
    config = context.records.storage.get_json(key) | {"auto_map": {"AutoModel": "evil.Model"}}
    context.records.storage.put_json(key, config)
    with pytest.raises(InputRejected, match="SHA-256") as refused:
        run_unlearn_job(context)
    assert refused.value.code == "input_corrupted"


def test_load_model_refuses_custom_code_even_past_the_door(tmp_path):
    from app.schemas.models import ModelRecord
    from workers.formats.hf_models import HfFormatError, load_model
    from workers.jobs.run import error_for

    directory = bert_dir(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "x.Y"}}))
    record = ModelRecord(
        id="md_0123456789abcdef01", tenant="t", name="m", family="classifier",
        architecture="BertForSequenceClassification", model_type="bert", num_labels=2, has_tokenizer=True,
        files=[], size_bytes=0, sha256="0" * 64, source="upload", created_at=now(),
    )
    with pytest.raises(HfFormatError, match="custom code") as refused:
        load_model(directory, record)
    assert error_for(refused.value).code == "invalid_input"


def test_an_adapter_that_does_not_fit_the_model_is_rejected(api, text_job, adapter_dir):
    from workers.jobs.unlearn import run as run_unlearn_job

    directory = adapter_dir()  # a LoRA for the tiny Llama (q_proj, v_proj), not for this BERT
    adapter = api.post(
        "/v1/adapters",
        files={
            "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes()),
        },
    ).json()["id"]
    job_id = start(api, text_job | {"adapter": adapter})
    with pytest.raises(InputRejected, match="does not fit"):
        run_unlearn_job(context_for(api, job_id))


def test_causal_lm_full_weights_are_registered_as_a_new_model(api, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.factories import tiny_llama
    from tests.integration.test_unlearn_e2e import word_tokenizer
    from workers.jobs.unlearn import run as run_unlearn_job

    directory = tmp_path / "tiny-lm"
    tiny_llama(0, vocab_size=32).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    word_tokenizer().save_pretrained(directory)
    model = upload_model(api, directory)

    def lm_rows(rows) -> str:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        return api.post("/v1/datasets", files={"file": ("rows.jsonl", data)}).json()["id"]

    forget = lm_rows([{"prompt": "person0 city ?", "completion": "value1"}])
    holdout = lm_rows([{"prompt": "person5 city ?", "completion": "value3"}])
    body = {"type": "unlearn", "model": model["id"], "forget": {"dataset": forget}, "eval": holdout,
            "method": "grad_ascent", "params": {"steps": 2, "lr": 0.01}, "output": "weights"}
    job_id = start(api, body)
    result = run_unlearn_job(context_for(api, job_id))
    assert result.model_id == "md_" + job_id.split("_", 1)[1] and result.adapter_id is None
    assert "min_k_auc" in result.report["after"]
    record = api.get(f"/v1/models/{result.model_id}").json()
    assert record["family"] == "causal_lm" and record["has_tokenizer"] and record["source_job_id"] == job_id
    local = tmp_path / "downloaded"
    local.mkdir()
    for item in record["files"]:
        (local / item["name"]).write_bytes(api.get(f"/v1/models/{record['id']}/files/{item['name']}").content)
    stored = read_header(local / "model.safetensors", 1 << 24, 1000, dtypes=ALL_DTYPES)
    assert {info.dtype for info in stored.values()} == {"BF16"}  # trained in float32, stored as it came
    loaded = AutoModelForCausalLM.from_pretrained(local, use_safetensors=True)
    original = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, original.state_dict()[n])]
    assert changed  # the weights were trained
    assert AutoTokenizer.from_pretrained(local)("person0 city ?")["input_ids"]


def test_a_job_that_misses_its_goal_succeeds_with_a_warning_or_fails_when_it_must_meet_it(api, text_job):
    """The text job forgets one row whose label retain rows share (random forgetting) and has no eval rows:
    its goal cannot be measured, so it is not met — deterministically."""
    from app.errors import NotFound
    from app.jobs import lifecycle
    from workers.engines.unlearn import GoalNotMet
    from workers.jobs.outputs import output_adapter_id
    from workers.jobs.run import error_for
    from workers.jobs.unlearn import run as run_unlearn_job

    job_id = start(api, text_job)
    context = context_for(api, job_id)
    result = run_unlearn_job(context)
    assert result.report["goal_met"] is False and "cannot be measured" in result.report["goal_reason"]
    assert result.warnings == [f"goal not met: {result.report['goal_reason']}"]
    job = lifecycle.finish(context.records, job_id, "succeeded", result=result)
    warnings = [event.stage for event in job.events if event.stage.startswith("warning: goal not met")]
    assert warnings == [f"warning: {result.warnings[0]}"] and job.events[-1].stage == "succeeded"

    required = start(api, {**text_job, "require_goal": True})
    with pytest.raises(GoalNotMet, match="cannot be measured") as refused:
        run_unlearn_job(context_for(api, required))
    assert error_for(refused.value).code == "goal_not_met"
    with pytest.raises(NotFound):  # nothing was published
        context.records.get_adapter(context.job.tenant, output_adapter_id(required))


def test_goal_probes_reference_and_seeds_are_validated_at_the_door(api, text_job):
    bad = [
        {"goal": {"retain_accuracy_drop": -1}},
        {"goal": {"max_steps": 0}},
        {"goal": {"bogus": 1}},
        {"probes": ["quantize", "quantize"]},
        {"probes": ["prune"]},
        {"reference": "oracle"},
        {"reference_params": {"steps": 10}},
        {"reference": "retrain", "reference_params": {"steps": 0}},
        {"seeds": []},
        {"seeds": [1, 1]},
        {"seeds": [-1]},
    ]
    for change in bad:
        response = api.post("/v1/jobs", json={**text_job, **change})
        assert response.status_code == 422, (change, response.text)
    good = {"goal": {"max_steps": 200}, "require_goal": True, "probes": ["quantize", "relearn"],
            "reference": "retrain", "reference_params": {"steps": 10}, "seeds": [0, 1]}
    response = api.post("/v1/jobs", json={**text_job, **good})
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert spec["goal"]["max_steps"] == 200 and spec["reference_params"]["steps"] == 10


def test_reference_seeds_and_probes_reach_the_summary_and_the_report(api, text_job):
    from workers.jobs.unlearn import run as run_unlearn_job

    evaluation = upload_rows(api, [{"text": "good book", "label": 1}, {"text": "awful movie", "label": 0},
                                   {"text": "very bad movie", "label": 0}, {"text": "fine movie", "label": 1}])
    body = {**text_job, "forget": {"dataset": text_job["forget"]["dataset"], "rows": [0, 1]}, "eval": evaluation,
            "reference": "retrain", "reference_params": {"steps": 5, "lr": 0.01, "batch_size": 2},
            "seeds": [0, 1], "probes": ["quantize", "relearn"]}
    context = context_for(api, start(api, body))
    result = run_unlearn_job(context)
    summary = result.report
    assert {"UA", "RA", "TA", "MIA", "avg_gap"} <= set(summary["gap"]) and summary["time_vs_reference"] > 0
    assert summary["seeds"]["seeds"] == [0, 1] and set(summary["seeds"]["after"]["UA"]) == {"mean", "std", "values"}
    assert set(summary["probes"]) == {"quantize", "relearn"} and "robust" in summary
    report = context.records.storage.get_json(result.report_key)
    assert report["reference"]["method"] == "retrain" and report["probes"]["quantize"]["int8"]["after"]


def test_ssd_into_a_fresh_lora_is_refused_at_submission(api, text_job):
    """ssd only scales weights down; a fresh LoRA's update is zero, so the job could change nothing."""
    ssd = {**text_job, "method": "ssd", "params": {}}
    response = api.post("/v1/jobs", json=ssd)
    assert response.status_code == 422 and "a fresh LoRA's update is zero" in response.text, response.text
    assert api.post("/v1/jobs", json={**ssd, "output": "weights"}).status_code == 202
