"""Each language-model method raises the forget answers' NLL while the retain NLL stays bounded.

Margins (the fixture's data carries them; see conftest): forget and retain answers share no token, so a
method with a retain term (`grad_diff`, `npo`, `simnpo`, `idk`, `rmu`) can forget without touching retain.
Measured on the locked versions, and under 1e-6 relative perturbations of the fixture's training (a stand-in
for another CPU's rounding; every figure moved by < 0.02): the forget NLL rises by ≥ 1.0 (rmu; the others
≥ 3) against the 0.5 asserted; the retain NLL rises by ≤ 0.05 with a retain term against the 1.0 asserted
(20×), by 0.28 for `grad_ascent` (bound 3.0) and ≤ 0.9 for `flat` (bound 4.0), which train on forget rows only.
"""

from __future__ import annotations

import pytest

from workers.engines.unlearn import unlearn

METHODS = {
    "grad_ascent": {"lr": 1e-3, "steps": 10},
    "grad_diff": {"lr": 1e-3, "steps": 20},
    "npo": {"lr": 1e-3, "steps": 20},
    "simnpo": {"lr": 3e-3, "steps": 20},
    "idk": {"lr": 1e-3, "steps": 20},
    "flat": {"lr": 1e-3, "steps": 15, "template": "I don't know."},
    "rmu": {"lr": 3e-2, "steps": 30, "layer": 0, "trained_layers": [0], "steering_coeff": 20.0, "alpha": 10.0},
    "npo_gu": {"lr": 1e-3, "steps": 20, "gu": True},
    "simnpo_gu": {"lr": 3e-3, "steps": 20, "gu": True},
}
RETAIN_NLL_BOUND = {"grad_ascent": 3.0, "flat": 4.0}  # forget-only methods may hurt retain more
# RMU misdirects the forget rows' hidden states: their answers go (exact match 0, NLL 0.001 → 1.05) but stay
# far likelier than never-seen answers (held-out NLL 6.6), so the membership signal is not what it promises.
NO_MEMBERSHIP_PROMISE = {"rmu"}


@pytest.mark.parametrize("case", sorted(METHODS))
def test_forget_nll_rises_and_retain_nll_stays_bounded(case, lm, lm_data, tokenizer):
    method = case.removesuffix("_gu")
    out = unlearn(
        lm,
        "causal_lm",
        method,
        METHODS[case],
        lm_data["forget"],
        lm_data["retain"],
        lm_data["holdout"],
        tokenizer=tokenizer,
    )
    before, after = out.report["before"], out.report["after"]
    assert before["forget_sequence_exact_match"] == 100.0 and before["retain_sequence_exact_match"] == 100.0
    assert after["forget_nll"] > before["forget_nll"] + 0.5
    assert after["forget_sequence_exact_match"] < 100.0
    assert after["retain_nll"] < before["retain_nll"] + RETAIN_NLL_BOUND.get(method, 1.0)
    if method not in NO_MEMBERSHIP_PROMISE:
        assert after["min_k_auc"] < before["min_k_auc"]
    assert out.report["steps"] == METHODS[case]["steps"]


def test_flat_raises_the_template_s_probability_as_it_lowers_the_answer_s(lm, lm_data, tokenizer):
    """FLAT (Total Variation) maximises the template's mean token probability P̄_e and minimises the forget
    answers' P̄_f. Measured: P̄_e 0.157 → 0.250 and P̄_f 0.999 → 0.500 after 15 steps at 1e-3; asserted: P̄_e
    up by ≥ 0.03 (a third of the rise), P̄_f down by ≥ 0.2."""
    import torch

    from workers.engines.unlearn.losses import mean_token_probability

    template = lm_data["forget"].with_completion("I don't know.")

    def probabilities() -> tuple[float, float]:
        with torch.no_grad():
            rows = range(len(template))
            return (
                float(mean_token_probability(lm, template.collate(rows)).mean()),
                float(mean_token_probability(lm, lm_data["forget"].collate(rows)).mean()),
            )

    template_before, forget_before = probabilities()
    params = {"lr": 1e-3, "steps": 15, "template": "I don't know."}
    unlearn(lm, "causal_lm", "flat", params, lm_data["forget"], None, tokenizer=tokenizer)
    template_after, forget_after = probabilities()
    assert template_after > template_before + 0.03
    assert forget_after < forget_before - 0.2


def test_retrain_from_scratch_fits_retain_and_not_forget(lm, lm_data, tokenizer):
    out = unlearn(
        lm,
        "causal_lm",
        "retrain",
        {"lr": 1e-2, "steps": 100, "batch_size": 24},
        lm_data["forget"],
        lm_data["retain"],
        lm_data["holdout"],
        tokenizer=tokenizer,
    )
    after = out.report["after"]
    assert after["retain_sequence_exact_match"] > 90.0
    assert after["forget_sequence_exact_match"] < 50.0
