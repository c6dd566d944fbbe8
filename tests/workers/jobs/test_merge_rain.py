"""A `rain` merge job in-process (real redis-server, moto S3, no Celery): a tiny Llama with a word-level tokenizer
that has `<think>` / `</think>`, an instruction adapter, reasoning and instruction rows; the job succeeds and its
report holds the projection and the coefficients; a marker outside the vocabulary fails the job with
`invalid_input` before any compute."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.app.test_api import upload
from tests.workers.jobs.test_run import run_in_process
from tests.workers.test_unlearning_pipeline import upload_model
from workers.jobs.outputs import report_key

WORDS = ["what", "is", "two", "plus", "three", "so", "five", "answer", "in", "caps", "FIVE", "ok", "think", "hard"]
VOCAB = ["[PAD]", "[UNK]", "<s>", "</s>", "<think>", "</think>", *WORDS]


def llama_dir(root: Path, tokenizer: bool = True) -> Path:
    """A tiny random Llama saved with safetensors, with (or without) a word-level tokenizer holding the markers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    directory = root / ("llama" if tokenizer else "llama-no-tokenizer")
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    if tokenizer:
        backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                eos_token="</s>", additional_special_tokens=["<think>", "</think>"]
                                ).save_pretrained(directory)
    return directory


def upload_rows(api, rows: list[dict]) -> str:
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    response = api.post("/v1/datasets", files={"file": ("rows.jsonl", data)},
                        data={"num_labels": "2"} if "label" in rows[0] else {})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def llama_adapter(directory: Path, base: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(directory)
    return directory


REASONING = [
    {"prompt": "what is two plus three", "completion": "<think> two plus three so five </think> five"},
    {"prompt": "what is three plus two", "completion": "<think> think hard so five </think> five"},
]
INSTRUCTION = [{"prompt": "answer in caps what is two plus three", "completion": "FIVE"},
               {"prompt": "answer in caps ok", "completion": "OK ok"}]


def rain_job(api, tmp_path: Path, markers: list[str] | None = None, reasoning: list[dict] | None = None,
             params: dict | None = None) -> str:
    base = llama_dir(tmp_path)
    model = upload_model(api, base)
    response = upload(api, llama_adapter(tmp_path / "instruction", base), "instruction")
    assert response.status_code == 201, response.text
    calibration = {"model": model["id"], "reasoning": upload_rows(api, reasoning or REASONING),
                   "instruction": upload_rows(api, INSTRUCTION)}
    if markers is not None:
        calibration["markers"] = markers
    body = {"type": "merge", "adapters": [{"id": response.json()["id"]}], "method": "rain",
            "params": params or {"alpha_min": 0.5}, "calibration": calibration}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_a_rain_job_merges_and_reports_the_projection_and_the_coefficients(api, tmp_path) -> None:
    job = run_in_process(api, rain_job(api, tmp_path))
    assert job.state == "succeeded", job.error
    report = api.app.state.records.storage.get_json(report_key(job))
    assert report["method"] == "rain"
    rain = report["rain"]
    assert rain["preserve"] == "features" and rain["reasoning_rows"] == 2 and rain["instruction_rows"] == 2
    assert len(rain["alpha"]) == 2 and all(len(layer) == 4 for layer in rain["alpha"])
    assert all(0.5 <= a <= 1.5 for layer in rain["alpha"] for a in layer)
    assert set(rain["projection"]) == {f"model.layers.{i}.{m}" for i in range(2)
                                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    for entry in rain["projection"].values():
        assert entry["constraints"] == 4 and entry["residual"] < 1e-5  # two rows, two markers each
    adapter = api.get(f"/v1/adapters/{job.result.adapter_id}")
    assert adapter.status_code == 200, adapter.text
    # the update survived the projection and the coefficients: no warning
    assert job.result.report["output_norm_fraction_total"] > 0.3 and job.result.warnings == []


def test_a_rain_merge_that_all_but_removes_the_update_succeeds_with_a_warning(api, tmp_path) -> None:
    """Coefficients capped at 0.01 leave about 1% of the update: the job says the result is the base model."""
    job = run_in_process(api, rain_job(api, tmp_path, params={"alpha_max": 0.01}))
    assert job.state == "succeeded", job.error
    kept = job.result.report["output_norm_fraction_total"]
    assert 0.0 < kept < 0.05
    assert len(job.result.warnings) == 1 and "all but the base model" in job.result.warnings[0]
    events = api.get(f"/v1/jobs/{job.id}/events").json()["items"]
    assert any("all but the base model" in json.dumps(event) for event in events)


def test_a_marker_outside_the_vocabulary_fails_the_job_before_compute(api, tmp_path) -> None:
    job = run_in_process(api, rain_job(api, tmp_path, markers=["<reason>", "</reason>"]))
    assert job.state == "failed"
    assert job.error.code == "invalid_input"
    assert "'<reason>' is not in the vocabulary" in job.error.message


def test_reasoning_rows_without_both_markers_fail_the_job(api, tmp_path) -> None:
    rows = [{"prompt": "what is two plus three", "completion": "<think> two plus three so five five"},  # no end
            {"prompt": "what is two", "completion": "</think> <think> two </think> five"}]  # end first, two ends
    job = run_in_process(api, rain_job(api, tmp_path, reasoning=rows))
    assert job.state == "failed" and job.error.code == "invalid_input"
    assert "holds exactly one '<think>' followed by one '</think>'" in job.error.message


def test_admission_refuses_a_model_without_tokenizer_and_a_spec_without_calibration(api, tmp_path) -> None:
    base = llama_dir(tmp_path)
    bare = upload_model(api, llama_dir(tmp_path, tokenizer=False))
    assert bare["has_tokenizer"] is False
    adapter = upload(api, llama_adapter(tmp_path / "instruction", base), "instruction").json()["id"]
    reasoning = upload_rows(api, REASONING)
    body = {"type": "merge", "adapters": [{"id": adapter}], "method": "rain",
            "calibration": {"model": bare["id"], "reasoning": reasoning}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "incompatible_inputs"
    assert "no tokenizer" in response.json()["error"]["message"]
    # rain without its calibration block, and a calibration block on a method that takes none
    for spec in ({"method": "rain"}, {"method": "task_arithmetic", "calibration": body["calibration"]}):
        response = api.post("/v1/jobs", json={"type": "merge", "adapters": [{"id": adapter}], **spec})
        assert response.status_code == 422, response.text
        assert "calibration" in json.dumps(response.json())
    # classification rows are not calibration rows
    rows = upload_rows(api, [{"text": "two plus three", "label": 0}, {"text": "five", "label": 1}])
    model = upload_model(api, base)
    response = api.post("/v1/jobs", json={"type": "merge", "adapters": [{"id": adapter}], "method": "rain",
                                          "calibration": {"model": model["id"], "reasoning": rows}})
    assert response.status_code == 422 and response.json()["error"]["code"] == "incompatible_inputs", response.text


def test_the_memory_estimate_counts_the_calibration_model(api, tmp_path) -> None:
    from tests.workers.test_unlearning_pipeline import context_for
    from workers.jobs.memory import FP32, estimate

    job_id = rain_job(api, tmp_path)
    need, detail = estimate(context_for(api, job_id))
    from transformers import LlamaForCausalLM

    parameters = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(tmp_path / "llama").state_dict().values())
    assert f"a calibration model of {parameters} parameters" in detail
    assert need >= 2 * parameters * FP32
