"""Robustness probes: round-to-nearest quantization and relearning, and what `robust` means."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from workers.engines.unlearn.probes import _merged, quantize_weights, split_forget
from workers.engines.unlearn.protocol import unlearn_job


def test_quantization_is_symmetric_per_output_channel_round_to_nearest():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -0.45, 0.26], [0.02, -0.04, 0.01]]))
        layer.bias.copy_(torch.tensor([0.123, -0.456]))
    original = layer.weight.detach().clone()
    assert quantize_weights(layer, 4) == 1  # the weight; the bias stays float
    for row in range(2):  # plain: s = max|w|/7, w -> s*round(w/s)
        scale = original[row].abs().max() / 7
        assert torch.allclose(layer.weight[row], torch.round(original[row] / scale) * scale)
    assert torch.allclose(layer.weight[0], torch.tensor([1.0, -3 / 7, 2 / 7]))  # -3.15 -> -3, 1.82 -> 2
    assert torch.equal(layer.bias, torch.tensor([0.123, -0.456]))
    layer8 = nn.Linear(3, 2)
    with torch.no_grad():
        layer8.weight.copy_(original)
    quantize_weights(layer8, 8)
    assert float((layer8.weight - original).abs().max()) <= float(original.abs().amax(dim=1).max()) / 127 / 2 + 1e-7


def test_a_lora_is_merged_before_it_is_quantized(trained_mlp):
    model = get_peft_model(
        copy.deepcopy(trained_mlp), LoraConfig(r=2, target_modules=["net.0"], init_lora_weights=False)
    )
    merged = _merged(model)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        x = torch.randn(4, 64)
        assert torch.allclose(merged(x), model(x), atol=1e-5)  # the adapter's change is in the weights


def test_the_relearning_rows_are_a_seeded_tenth_and_the_rest_is_measured(digits):
    taught, rest = split_forget(digits["forget"], seed=0)
    assert len(taught) == 8 and len(taught) + len(rest) == len(digits["forget"])  # ceil(0.1 * 74)
    again, _ = split_forget(digits["forget"], seed=0)
    assert torch.equal(taught.inputs["inputs"], again.inputs["inputs"])


def test_probes_report_beside_the_after_metrics_and_say_when_forgetting_comes_back(trained_mlp, mlp, digits):
    """random_label with `params: {}` meets the class-wise goal (the 3s at 2.7 % here). int8/int4 rounding keeps
    them there (measured 2.7 %, floor 10 %: 5 images of margin); 10 relearning steps on 8 of the 3s bring the
    other 3s back to 100 % (floor 10 %), while the retrained reference, relearning the same rows, stays at 0 %."""
    out = unlearn_job(
        mlp,
        "classifier",
        "random_label",
        {},
        digits["forget"],
        digits["retain"],
        digits["test"],
        probes=["quantize", "relearn"],
        reference_model=copy.deepcopy(trained_mlp),
        reference_params={"steps": 100, "lr": 1e-2},
    )
    report = out.report
    assert report["goal_met"] is True
    quantize, relearn = report["probes"]["quantize"], report["probes"]["relearn"]
    assert quantize["int8"]["robust"] is True and quantize["int4"]["robust"] is True
    assert {"UA", "RA", "TA", "MIA"} <= set(quantize["int4"]["after"])
    assert relearn["rows"] == 8 and relearn["measured_on"] == len(digits["forget"]) - 8
    assert relearn["before"]["forget_conditions_met"] is True
    assert relearn["after"]["values"]["forget_accuracy"] > 50.0 and relearn["robust"] is False
    assert relearn["reference"]["after"]["values"]["forget_accuracy"] < 50.0
    assert report["robust"] is False


def test_a_run_that_did_not_meet_its_goal_has_nothing_to_bring_back(mlp, digits):
    out = unlearn_job(
        mlp,
        "classifier",
        "finetune",
        {"steps": 1, "lr": 1e-6},
        digits["forget"],
        digits["retain"],
        digits["test"],
        probes=["quantize", "relearn"],
    )
    assert out.report["goal_met"] is False
    assert out.report["probes"]["relearn"]["robust"] is None
    assert out.report["probes"]["quantize"]["robust"] is None and out.report["robust"] is None


@pytest.mark.parametrize("probe", ["quantize", "relearn"])
def test_language_model_probes_run(probe, lm, lm_data, tokenizer):
    out = unlearn_job(
        lm,
        "causal_lm",
        "npo",
        {"lr": 1e-3, "steps": 10},
        lm_data["forget"],
        lm_data["retain"],
        lm_data["holdout"],
        tokenizer=tokenizer,
        probes=[probe],
    )
    result = out.report["probes"][probe]
    assert result["robust"] in (True, False, None)
    figures = result["int4"]["after"] if probe == "quantize" else result["after_metrics"]
    assert "forget_nll" in figures and "min_k_auc" in figures
