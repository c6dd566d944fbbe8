"""A merge tuned on the user's validation data, end to end on a causal LM: register a tiny Llama with a
tokenizer, upload two real peft adapters and each task's validation rows, submit a merge with a `tune` block,
and check the job's table and chosen λ against a brute-force evaluation written plainly here (dense
W + λ·ΣΔW_t, answer NLL computed by hand), through real Redis, S3 and a Celery worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.factories import make_adapter, tiny_llama
from tests.integration.conftest import upload_dir, wait_for_job
from tests.integration.test_merge_e2e import dense_merge_model
from tests.integration.test_unlearn_e2e import PEOPLE, VALUES, register, upload_rows, word_tokenizer

pytestmark = pytest.mark.integration

# a word-level vocabulary, and weights large enough that the logits (and so the NLLs) depend on the adapters
MODEL = {"vocab_size": 32, "initializer_range": 0.3}
LAMBDAS = [0.0, 0.5, 1.0, 2.0, 4.0]


def with_adapters(adapters: list[tuple[Path, float]]):
    """The tiny Llama with base weights plus Σ c_t·s_t·B_t·A_t (dense, written plainly)."""
    return dense_merge_model(adapters, **MODEL)


def encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """Prompt ids (with special tokens) + answer ids (without) + EOS, and where the answer starts."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    answer = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return prompt_ids + answer, len(prompt_ids)


@torch.no_grad()
def answer_nll(model, tokenizer, rows: list[dict]) -> float:
    """Mean over rows of each row's mean −log p(answer token | everything before it)."""
    per_row = []
    for row in rows:
        ids, start = encode(tokenizer, row["prompt"], row["completion"])
        log_probs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        per_row.append(-sum(float(log_probs[i - 1, ids[i]]) for i in range(start, len(ids))) / (len(ids) - start))
    return sum(per_row) / len(per_row)


@torch.no_grad()
def greedy_rows(model, tokenizer, prompts: list[str]) -> list[dict]:
    """Each prompt answered by the model's own most likely value word: rows its adapter fits best."""
    value_ids = [tokenizer.convert_tokens_to_ids(v) for v in VALUES]
    rows = []
    for prompt in prompts:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        logits = model(torch.tensor([ids])).logits[0, -1]
        rows.append({"prompt": prompt, "completion": VALUES[int(logits[value_ids].argmax())]})
    return rows


def test_a_tuned_merge_on_a_causal_lm_picks_the_lambda_brute_force_picks(client, tmp_path):
    model_dir = tmp_path / "tiny-lm"
    tiny_llama(0, **MODEL).save_pretrained(model_dir, safe_serialization=True)
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(model_dir)
    model = register(client, model_dir, "tiny-lm")

    adapters = [
        make_adapter(
            tmp_path / f"task{t}",
            seed=10 + t,
            r=4,
            alpha=8,
            **MODEL,
            targets=("v_proj", "o_proj", "up_proj", "down_proj"),
        )
        for t in range(2)
    ]
    adapter_ids = [upload_dir(client, directory, f"task{t}")["id"] for t, directory in enumerate(adapters)]
    prompts = [f"{who} city ?" for who in PEOPLE] + [f"{who} lives in" for who in PEOPLE]
    validation = [greedy_rows(with_adapters([(directory, 1.0)]), tokenizer, prompts) for directory in adapters]
    datasets = [upload_rows(client, rows, f"val{t}")["id"] for t, rows in enumerate(validation)]

    body = {
        "type": "merge",
        "adapters": [{"id": adapter_id, "weight": 1.0} for adapter_id in adapter_ids],
        "method": "task_arithmetic",
        "params": {},
        "output": {"name": "tuned", "rank": 8},
        "tune": {
            "model": model["id"],
            "validation": [{"adapter": t, "dataset": datasets[t]} for t in range(2)],
            "search": {"lambda": LAMBDAS},
            "objective": "mean",
        },
    }
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    done = wait_for_job(client, job.json()["id"], timeout=240)
    assert done["state"] == "succeeded", done
    tune = client.get(f"/v1/jobs/{done['id']}/report").json()["tune"]

    # brute force: every λ, both tasks, dense weights, NLL by hand, normalised by the task's own adapter
    own = [answer_nll(with_adapters([(d, 1.0)]), tokenizer, rows) for d, rows in zip(adapters, validation, strict=True)]
    expected = []
    for lam in LAMBDAS:
        merged = with_adapters([(d, lam) for d in adapters])
        nll = [answer_nll(merged, tokenizer, rows) for rows in validation]
        expected.append((nll, sum(o / n for o, n in zip(own, nll, strict=True)) / 2))
    best = max(range(len(LAMBDAS)), key=lambda i: expected[i][1])
    objectives = sorted(value for _, value in expected)
    assert objectives[-1] - objectives[-2] > 1e-3  # the grid has one clear winner, so the pick is meaningful

    assert [row["point"]["lambda"] for row in tune["table"]] == LAMBDAS
    for row, (nll, value) in zip(tune["table"], expected, strict=True):
        assert [task["score"] for task in row["tasks"]] == pytest.approx(nll, rel=1e-4)
        assert row["objective"] == pytest.approx(value, rel=1e-4)
    assert [task["own"] for task in tune["table"][0]["tasks"]] == pytest.approx(own, rel=1e-4)
    assert tune["best"] == best and tune["best_point"] == {"lambda": LAMBDAS[best]}
    assert tune["metric"].startswith("mean answer NLL")
    events = client.get(f"/v1/jobs/{done['id']}/events").json()
    assert any(f"{len(LAMBDAS)}/{len(LAMBDAS)} grid points" in json.dumps(event) for event in events["items"])
