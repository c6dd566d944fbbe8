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
    "flat": {"lr": 1e-3, "steps": 15},
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
    assert before["forget_exact_match"] == 100.0 and before["retain_exact_match"] == 100.0
    assert after["forget_nll"] > before["forget_nll"] + 0.5
    assert after["forget_exact_match"] < 100.0
    assert after["retain_nll"] < before["retain_nll"] + RETAIN_NLL_BOUND.get(method, 1.0)
    if method not in NO_MEMBERSHIP_PROMISE:
        assert after["min_k_auc"] < before["min_k_auc"]
    assert out.report["steps"] == METHODS[case]["steps"]


def test_flat_and_idk_teach_the_template(lm, lm_data, tokenizer):
    template = lm_data["forget"].with_completion("I don't know.")
    from workers.engines.unlearn.metrics import lm_report

    before = lm_report(lm, template, None, None, lm.device)["forget_nll"]
    unlearn(lm, "causal_lm", "flat", {"lr": 1e-3, "steps": 15}, lm_data["forget"], None, tokenizer=tokenizer)
    after = lm_report(lm, template, None, None, lm.device)["forget_nll"]
    assert after < before


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
    assert after["retain_exact_match"] > 90.0
    assert after["forget_exact_match"] < 50.0
