"""AMEND_PRECISION in the shared loop: a bfloat16 run computes its training forward passes under
`torch.autocast` (on the CPU too) and still trains; float32 (no autocast) is the path it always was."""

from __future__ import annotations

import torch
from torch import nn

from tests.workers.engines.unlearn.conftest import MLP
from workers import device as worker_device
from workers.engines.unlearn import unlearn
from workers.engines.unlearn.losses import classifier_logits, per_sample_ce


def _loss(model: nn.Module, data) -> float:
    batch = data.collate(torch.arange(len(data)))
    with torch.no_grad():
        return float(per_sample_ce(classifier_logits(model, batch), batch["labels"]).mean())


def _fresh_mlp() -> MLP:
    torch.manual_seed(1)
    return MLP()


def test_bfloat16_autocasts_the_forward_passes_and_still_trains(digits):
    model = _fresh_mlp()
    seen: set[torch.dtype] = set()
    hook = model.net[0].register_forward_hook(  # training passes (with grad); evaluations run without autocast
        lambda module, args, out: seen.add(out.dtype) if torch.is_grad_enabled() else None
    )
    before = _loss(model, digits["retain"])
    outcome = unlearn(model, "classifier", "finetune", {"steps": 30, "lr": 1e-2}, digits["forget"],
                      digits["retain"], autocast=torch.bfloat16)
    hook.remove()
    assert seen == {torch.bfloat16}  # every training forward pass ran under autocast
    assert outcome.report["autocast"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    assert _loss(model, digits["retain"]) < 0.5 * before


def test_float32_is_unchanged_bit_for_bit(digits):
    cpu = worker_device.resolve("cpu")
    assert worker_device.autocast_dtype(cpu, "auto") is None  # auto on a CPU: float32, no autocast
    assert worker_device.autocast_dtype(cpu, "float32") is None
    runs = []
    for autocast in (None, worker_device.autocast_dtype(cpu, "float32")):
        model = _fresh_mlp()
        seen: set[torch.dtype] = set()
        model.net[0].register_forward_hook(lambda module, args, out, seen=seen: seen.add(out.dtype))
        outcome = unlearn(model, "classifier", "finetune", {"steps": 10, "lr": 1e-2}, digits["forget"],
                          digits["retain"], autocast=autocast)
        assert seen == {torch.float32} and outcome.report["autocast"] is None
        runs.append([p.detach().clone() for p in model.parameters()])
    reference = _fresh_mlp()  # the same run without the argument: the float32 path as it was
    unlearn(reference, "classifier", "finetune", {"steps": 10, "lr": 1e-2}, digits["forget"], digits["retain"])
    runs.append([p.detach().clone() for p in reference.parameters()])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], _fresh_mlp().parameters(), strict=True))


def test_bfloat16_with_gu_and_a_language_model(lm, lm_data, tokenizer):
    """The GU projection's per-row passes and a causal LM's NLL also run under autocast."""
    outcome = unlearn(lm, "causal_lm", "grad_diff", {"steps": 3, "lr": 1e-4, "gu": True}, lm_data["forget"],
                      lm_data["retain"], lm_data["holdout"], tokenizer=tokenizer, autocast=torch.bfloat16)
    assert outcome.report["autocast"] == "bfloat16"
    assert 0.0 <= outcome.report["gu_kept_fraction"] <= 1.0
    assert all(torch.isfinite(p).all() for p in lm.parameters())


def test_determinism_switch(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert worker_device.configure_determinism(False) is False
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        assert worker_device.configure_determinism(True, seed=3) is True
        assert torch.are_deterministic_algorithms_enabled()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        first = torch.rand(3)
        worker_device.configure_determinism(True, seed=3)
        assert torch.equal(first, torch.rand(3))
    finally:
        torch.use_deterministic_algorithms(False)
