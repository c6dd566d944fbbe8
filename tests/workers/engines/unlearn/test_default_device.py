"""Every unlearning method creates its tensors on a named device: run with torch's default device set to "meta"
(as `tests/workers/test_device.py` does for merges and compressions), a tensor made without naming its device
lands on "meta" and the first operation that mixes it with real tensors raises — so a forgotten `device=` fails
here, as it would on a GPU worker. Rows live on the host (CPU, named); the model on the device it is given."""

from __future__ import annotations

import copy

import pytest
import torch

from app.schemas.unlearn import UNLEARN_FAMILIES
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
    reference = unlearn(plain, family, method, {"steps": 2}, *data, tokenizer=tokenizer, device="cpu")
    with torch.device("meta"):
        outcome = unlearn(strict, family, method, {"steps": 2}, *data, tokenizer=tokenizer, device="cpu")
    for (name, a), b in zip(plain.named_parameters(), strict.parameters(), strict=True):
        assert b.device.type == "cpu"
        assert torch.equal(a, b), name
    assert outcome.report["after"] == reference.report["after"]
