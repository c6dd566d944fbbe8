"""Compression jobs run in-process (real redis-server, moto S3, no Celery): through the API to a stored,
downloadable adapter with its report; the compact download; extract from two registered models; and the
forgetting re-check of an adapter an unlearning job made."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.adapter_store import store_adapter
from app.jobs import lifecycle
from app.records import new_id, now
from app.schemas.jobs import JobRecord, JobResult
from app.storage import keys
from tests.app.jobs.test_compress import save_llama, upload_model_dir
from tests.app.test_api import upload
from tests.factories import tiny_llama
from workers.formats.compact import read_compact
from workers.jobs import run
from workers.jobs.forgetting import verdict
from workers.jobs.outputs import output_adapter_id


def run_job(api, body: dict):
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    run._run_leased(job_id, api.app.state.settings, api.app.state.records, SimpleNamespace(lost=False))
    return api.app.state.records.get_job(job_id)


def download(api, adapter_id: str, into, query: str = ""):
    into.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        response = api.get(f"/v1/adapters/{adapter_id}/files/{name}{query if name.endswith('tensors') else ''}")
        assert response.status_code == 200, response.text
        (into / name).write_bytes(response.content)
    return into


def test_rank_reduce_job_end_to_end(api, adapter_dir, tmp_path):
    from peft import PeftModel

    source = adapter_dir("in", seed=1, r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    adapter_id = upload(api, source, "big").json()["id"]
    job = run_job(api, {"type": "compress", "adapter": adapter_id, "method": "rank_reduce",
                        "output": {"name": "small", "energy": 1.0}})
    assert job.state == "succeeded", job.error
    summary = job.result.report
    assert summary["rel_error"] < 1e-5 and summary["energy_kept"] == pytest.approx(1.0, abs=1e-9)
    assert summary["params_in"] == summary["params_out"] and "forgetting_preserved" not in summary
    out = api.get(f"/v1/adapters/{job.result.adapter_id}").json()
    assert out["name"] == "small" and out["source_job_id"] == job.id and out["rank"] == 8
    report = api.get(f"/v1/jobs/{job.id}/report").json()
    assert len(report["modules"]) == 6 and report["inputs"]["adapter"]["id"] == adapter_id
    local = download(api, job.result.adapter_id, tmp_path / "out")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_llama(0), source)(tokens).logits
        got = PeftModel.from_pretrained(tiny_llama(0), local)(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a redelivered job finds its output and report and does not recompute
    records = api.app.state.records
    from workers.jobs.compress import existing_result
    from workers.jobs.context import JobContext

    again = existing_result(JobContext(records.get_job(job.id), records, api.app.state.settings,
                                       SimpleNamespace(lost=False)))
    assert again is not None and again.adapter_id == job.result.adapter_id


def test_budget_job_reports_allocation_and_keeps_within_budget(api, adapter_dir):
    adapter_id = upload(api, adapter_dir("in", seed=2, r=8, targets=("q_proj", "down_proj"))).json()["id"]
    job = run_job(api, {"type": "compress", "adapter": adapter_id, "method": "rank_reduce",
                        "output": {"budget_bytes": 4 * 1000}})
    assert job.state == "succeeded", job.error
    summary = job.result.report
    assert summary["bytes_out"] <= 4000 and 0 < summary["energy_kept"] < 1
    report = api.get(f"/v1/jobs/{job.id}/report").json()
    assert report["size_rule"]["allocation"] == "exact"
    assert report["size_rule"]["energy_kept"] >= report["size_rule"]["uniform_energy_kept"]
    config = json.loads(api.get(f"/v1/adapters/{job.result.adapter_id}/files/adapter_config.json").content)
    ranks = {name: row["rank_out"] for name, row in report["modules"].items()}
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    assert all(config["rank_pattern"].get(name, config["r"]) == k for name, k in ranks.items() if k)


def test_sparsify_quantize_job_serves_the_peft_file_and_the_compact_form(api, adapter_dir, tmp_path):
    from peft import PeftModel

    adapter_id = upload(api, adapter_dir("in", seed=3, r=8)).json()["id"]
    job = run_job(api, {"type": "compress", "adapter": adapter_id, "method": "sparsify_quantize",
                        "params": {"density": 0.25, "bits": "int8"}})
    assert job.state == "succeeded", job.error
    out_id = job.result.adapter_id
    peft_dir = download(api, out_id, tmp_path / "peft")
    PeftModel.from_pretrained(tiny_llama(0), peft_dir)  # a normal PEFT adapter
    compact = api.get(f"/v1/adapters/{out_id}/files/adapter_model.safetensors?format=compact")
    assert compact.status_code == 200
    assert compact.headers["content-disposition"].endswith('"adapter_model.compact.safetensors"')
    (tmp_path / "c.safetensors").write_bytes(compact.content)
    factors, manifest = read_compact(tmp_path / "c.safetensors")
    assert manifest["bits"] == "int8" and len(compact.content) == job.result.report["compact_file_bytes"]
    from workers.engines.compress.sparsify_quantize import dequantize

    peft_tensors = load_file(peft_dir / "adapter_model.safetensors")
    assert all(torch.equal(dequantize(q), peft_tensors[f"{name}.weight"]) for name, q in factors.items())
    # only that form has one; the config has no compact form
    assert api.get(f"/v1/adapters/{adapter_id}/files/adapter_model.safetensors?format=compact").status_code == 404
    assert api.get(f"/v1/adapters/{out_id}/files/adapter_config.json?format=compact").status_code == 422
    assert api.get(f"/v1/adapters/{out_id}/files/adapter_model.safetensors?format=zip").status_code == 422


def test_extract_job_from_two_registered_models(api, tmp_path):
    from peft import PeftModel

    base_id = upload_model_dir(api, save_llama(tmp_path / "base"))
    tuned = tiny_llama(0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if name.endswith(("k_proj", "up_proj")):
                m, n = module.weight.shape
                module.weight += (torch.randn(m, 2, generator=g) * 0.05) @ (torch.randn(2, n, generator=g) * 0.05)
    tuned.save_pretrained(tmp_path / "tuned")
    tuned_id = upload_model_dir(api, tmp_path / "tuned")
    job = run_job(api, {"type": "compress", "method": "extract", "base_model": base_id, "model": tuned_id,
                        "output": {"name": "extracted", "rank": 4}})
    assert job.state == "succeeded", job.error
    assert job.result.report["rel_error"] < 1e-5 and job.result.report["skipped"] == 10  # q, v, o, gate, down × 2
    adapter = api.get(f"/v1/adapters/{job.result.adapter_id}").json()
    assert adapter["base_model"] == base_id and adapter["rank"] == 2
    local = download(api, job.result.adapter_id, tmp_path / "out")
    tokens = torch.randint(0, 64, (2, 12), generator=g)
    with torch.no_grad():
        got = PeftModel.from_pretrained(tiny_llama(0), local)(tokens).logits
        torch.testing.assert_close(got, tuned(tokens).logits, atol=1e-5, rtol=1e-5)
    assert api.app.state.records.get_job(job.id).input_model_ids() == [base_id, tuned_id]


@pytest.mark.parametrize(
    ("before", "after", "compressed", "preserved"),
    [
        (2.0, 5.0, 5.0, True),  # all kept
        (2.0, 5.0, 4.8, True),  # 93% kept (tolerance 10%)
        (2.0, 5.0, 4.0, False),  # 67% kept
        (2.0, 5.0, 2.1, False),  # undone
        (2.0, 2.0, 1.0, True),  # the unlearning changed nothing: nothing to lose
    ],
)
def test_forgetting_verdict_on_the_primary_metric(before, after, compressed, preserved):
    lm = verdict("causal_lm", {"forget_nll": before}, {"forget_nll": after}, {"forget_nll": compressed}, 0.1)
    assert lm["forgetting_preserved"] is preserved and lm["metric"] == "forget_nll"
    # a classifier's forget accuracy falls when it forgets: the same verdict with the sign flipped
    cls = verdict("classifier", {"forget_accuracy": -before}, {"forget_accuracy": -after},
                  {"forget_accuracy": -compressed}, 0.1)
    assert cls["forgetting_preserved"] is preserved


# -- an adapter made by an unlearning job: the compression re-measures its forgetting --------------------------

WORDS = ["good", "bad", "fine", "awful", "movie", "book", "very", "not"]


def classifier_dir(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def upload_rows(api, rows) -> str:
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    response = api.post("/v1/datasets", files={"file": ("rows.jsonl", data)}, data={"num_labels": "2"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def forgetting_adapter(model, directory, model_id: str):
    """A LoRA on the classifier head whose large direction adds the same to both logits (no prediction
    changes) and whose small direction negates the logit difference (every prediction flips): it "forgets"
    everything, and a rank-1 truncation — which keeps 99.9% of its energy — undoes exactly that."""
    weight = model.classifier.weight.detach()  # (2, 16)
    common, difference = torch.tensor([1.0, 1.0]) / 2**0.5, torch.tensor([1.0, -1.0]) / 2**0.5
    direction = torch.randn(16, generator=torch.Generator().manual_seed(0))
    lora_B = torch.stack([50.0 * common, difference], dim=1)  # (2, 2)
    lora_A = torch.stack([direction / direction.norm(), -2.0 * difference @ weight])  # (2, 16)
    directory.mkdir()
    save_file({"base_model.model.classifier.lora_A.weight": lora_A.contiguous(),
               "base_model.model.classifier.lora_B.weight": lora_B.contiguous()},
              str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["classifier"],
              "base_model_name_or_path": model_id, "lora_dropout": 0.0, "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return config, lora_B @ lora_A


def test_compressing_an_unlearned_adapter_rechecks_its_forgetting(api, tmp_path):
    model, tokenizer = classifier_dir(tmp_path / "bert")
    model_id = upload_model_dir(api, tmp_path / "bert")
    texts = ["very good movie", "awful book", "not fine", "good book", "bad movie"]
    with torch.no_grad():
        predicted = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    forget = upload_rows(api, [{"text": t, "label": p} for t, p in zip(texts[:3], predicted[:3], strict=True)])
    retain = upload_rows(api, [{"text": t, "label": p} for t, p in zip(texts[3:], predicted[3:], strict=True)])
    config, delta = forgetting_adapter(model, tmp_path / "unlearned", model_id)
    with torch.no_grad():  # the adapter flips every prediction: forget accuracy 100% -> 0%
        changed = model.classifier.weight + delta
        hidden = model.bert(**tokenizer(texts[:3], return_tensors="pt", padding=True)).pooler_output
        assert (hidden @ changed.T + model.classifier.bias).argmax(-1).tolist() == [1 - p for p in predicted[:3]]
    # the unlearning job that "made" it, with its before/after metrics, and the adapter it produced
    records, settings = api.app.state.records, api.app.state.settings
    tenant = "tenant-a"
    spec = {"type": "unlearn", "model": model_id, "forget": {"dataset": forget, "rows": None}, "retain": retain,
            "method": "random_label", "params": {}, "output": "adapter"}
    unlearn_job = JobRecord(id=new_id("jb"), tenant=tenant, type="unlearn", method="random_label", state="queued",
                            progress=0.0, stage="queued", created_at=now(), spec=spec)
    lifecycle.create(records, unlearn_job)
    report_key = keys.job(tenant, unlearn_job.id, "results/report.json")
    records.storage.put_json(report_key, {"before": {"forget_accuracy": 100.0, "retain_accuracy": 100.0},
                                          "after": {"forget_accuracy": 0.0, "retain_accuracy": 0.0}})

    def succeeded(record) -> bool:
        record.state, record.progress, record.stage = "succeeded", 1.0, "done"
        record.result = JobResult(report_key=report_key)
        return True

    records.mutate_job(unlearn_job.id, succeeded)
    unlearned = store_adapter(records, settings, tenant=tenant, adapter_id=new_id("ad"), name="unlearned",
                              config=config, weights=tmp_path / "unlearned" / "adapter_model.safetensors",
                              source_job_id=unlearn_job.id)

    kept = run_job(api, {"type": "compress", "adapter": unlearned.id, "method": "rank_reduce",
                         "output": {"energy": 1.0}})
    assert kept.state == "succeeded", kept.error
    assert kept.result.report["forgetting_preserved"] is True
    forgetting = api.get(f"/v1/jobs/{kept.id}/report").json()["forgetting"]
    assert forgetting["source_job_id"] == unlearn_job.id and forgetting["metric"] == "forget_accuracy"
    assert forgetting["compressed"]["forget_accuracy"] == 0.0 and forgetting["kept_fraction"] == 1.0

    truncated = run_job(api, {"type": "compress", "adapter": unlearned.id, "method": "rank_reduce",
                              "output": {"rank": 1}})
    assert truncated.state == "succeeded", truncated.error
    assert truncated.result.report["energy_kept"] > 0.999  # by energy, a near-perfect compression ...
    assert truncated.result.report["forgetting_preserved"] is False  # ... that undoes the forgetting
    forgetting = api.get(f"/v1/jobs/{truncated.id}/report").json()["forgetting"]
    assert forgetting["compressed"]["forget_accuracy"] == 100.0 and forgetting["kept_fraction"] == 0.0
    assert "retain_accuracy" in forgetting["compressed"]
    assert output_adapter_id(truncated.id) == truncated.result.adapter_id


def test_sparsify_quantize_defaults_keep_the_update_and_a_far_result_is_warned_about(api, adapter_dir):
    """With params {} the output is close to its input (int8 of every entry) and carries no warning; at
    ComPEFT's full-task-vector density on LoRA factors it is far from it, and the job says so."""
    adapter_id = upload(api, adapter_dir("in", seed=3, r=8)).json()["id"]
    default = run_job(api, {"type": "compress", "adapter": adapter_id, "method": "sparsify_quantize", "params": {}})
    assert default.state == "succeeded", default.error
    assert default.result.report["rel_error"] < 0.05 and default.result.report["ratio"] > 2
    assert default.result.warnings == []
    sparse = run_job(api, {"type": "compress", "adapter": adapter_id, "method": "sparsify_quantize",
                           "params": {"density": 0.1, "bits": "ternary"}})
    assert sparse.state == "succeeded" and sparse.result.report["rel_error"] > 0.5
    assert len(sparse.result.warnings) == 1 and "far from the input's" in sparse.result.warnings[0]
