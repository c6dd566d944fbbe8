"""Every unlearning method creates its tensors on a named device: run with torch's default device set to "meta"
(as `tests/workers/test_device.py` does for merges and compressions), a tensor made without naming its device
lands on "meta" and the first operation that mixes it with real tensors raises — so a forgotten `device=` fails
here, as it would on a GPU worker. Rows live on the host (CPU, named); the model on the device it is given."""

from __future__ import annotations

import copy

import pytest
import torch

from app.schemas.unlearn import UNLEARN_FAMILIES, accepts_learn
from workers.engines.unlearn import unlearn

CASES = sorted((method, family) for method, families in UNLEARN_FAMILIES.items() for family in families)


@pytest.mark.parametrize("method,family", CASES, ids=lambda v: str(v))
def test_unlearning_creates_no_tensor_on_a_default_device(method, family, trained_mlp, digits, trained_lm, lm_data,
                                                          tokenizer) -> None:
    if family == "classifier":
        model, data = trained_mlp, (digits["forget"], digits["retain"], digits["test"])
    else:
        model, data = trained_lm, (lm_data["forget"], lm_data["retain"], lm_data["holdout"])
    plain, strict = copy.deepcopy(model), copy.deepcopy(model)
    extra = {"learn": digits["test"]} if accepts_learn(method) else {}  # ug_clu: rows to learn
    reference = unlearn(plain, family, method, {"steps": 2}, *data, tokenizer=tokenizer, device="cpu", **extra)
    with torch.device("meta"):
        outcome = unlearn(strict, family, method, {"steps": 2}, *data, tokenizer=tokenizer, device="cpu", **extra)
    for (name, a), b in zip(plain.named_parameters(), strict.parameters(), strict=True):
        assert b.device.type == "cpu"
        assert torch.equal(a, b), name
    assert outcome.report["after"] == reference.report["after"]


@pytest.mark.parametrize("family", ["classifier", "causal_lm"])
def test_goal_driven_runs_seeds_reference_and_probes_create_no_tensor_on_a_default_device(
    family, trained_mlp, digits, trained_lm, lm_data, tokenizer
) -> None:
    """The range test, goal checks, a second seed, the retrained reference and both probes (protocol.py)."""
    from workers.engines.unlearn.protocol import unlearn_job

    if family == "classifier":
        model, method, data = trained_mlp, "finetune", (digits["forget"], digits["retain"], digits["test"])
    else:
        model, method, data = trained_lm, "grad_diff", (lm_data["forget"], lm_data["retain"], lm_data["holdout"])
    options = {"tokenizer": tokenizer, "device": "cpu", "goal": {"max_steps": 24, "check_every": 4, "eval_rows": 8},
               "seeds": [0, 1], "probes": ["quantize", "relearn"], "reference_params": {"steps": 2}}
    plain, strict = copy.deepcopy(model), copy.deepcopy(model)
    reference = unlearn_job(plain, family, method, {}, *data, reference_model=copy.deepcopy(model), **options)
    with torch.device("meta"):
        outcome = unlearn_job(strict, family, method, {}, *data, reference_model=copy.deepcopy(model), **options)
    for (name, a), b in zip(plain.named_parameters(), strict.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert outcome.report["after"] == reference.report["after"]
    assert set(outcome.report["probes"]) == {"quantize", "relearn"}
