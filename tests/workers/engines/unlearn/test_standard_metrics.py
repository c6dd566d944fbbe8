"""The field's standard measurements: ROUGE-L recall, TOFU's forget quality and model utility, MUSE's PrivLeak,
Avg.Gap to a retrained model, and several seeds — known answers first, then through the job protocol."""

from __future__ import annotations

import numpy as np
import pytest

from workers.engines.unlearn import LMData, unlearn
from workers.engines.unlearn.protocol import unlearn_job
from workers.engines.unlearn.standard_metrics import (
    PERTURBED,
    avg_gap,
    forget_quality,
    perturbed_rows,
    privleak,
    rouge_l_recall,
)


def test_rouge_l_recall_known_answers():
    assert rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(3 / 6)
    assert rouge_l_recall("The cat, sat!", "the cat sat") == 1.0  # case and punctuation are not words
    assert rouge_l_recall("b a", "a b") == pytest.approx(1 / 2)  # a subsequence keeps the order
    assert rouge_l_recall("a x b y c", "a b c") == 1.0  # recall: extra words cost nothing
    assert rouge_l_recall("", "a b") == 0.0


def test_forget_quality_is_the_ks_p_value():
    rng = np.random.default_rng(0)
    same = rng.normal(size=200)
    assert forget_quality(same, same) == pytest.approx(1.0)
    assert forget_quality(rng.normal(size=200), rng.normal(loc=3.0, size=200)) < 1e-20


def test_privleak_in_muse_orientation():
    assert privleak(1.0) == pytest.approx(-100.0)  # forget rows all look like members: under-unlearned
    assert privleak(0.5) == pytest.approx(0.0)
    assert privleak(0.25) == pytest.approx(50.0)  # more unlike members than unseen rows: over-unlearned
    assert privleak(0.6, reference_auc=0.6) == pytest.approx(0.0)


def test_avg_gap_known_answer():
    gaps = avg_gap(
        {"UA": 90.0, "RA": 99.0, "TA": 95.0, "MIA": 80.0}, {"UA": 100.0, "RA": 100.0, "TA": 96.0, "MIA": 100.0}
    )
    assert gaps == {"UA": 10.0, "RA": 1.0, "TA": 1.0, "MIA": 20.0, "avg_gap": 8.0}


def test_perturbed_answers_are_other_rows_answers(tokenizer):
    rows = [{"prompt": f"person{i} city ?", "completion": f"value{i % 3}"} for i in range(6)]
    data = LMData.from_rows(rows, tokenizer)
    perturbed = perturbed_rows(data, seed=0)
    assert perturbed is not None and len(perturbed) == PERTURBED * len(data)
    for i, row in enumerate(rows):
        for j in range(PERTURBED):
            assert perturbed.prompts[i * PERTURBED + j] == row["prompt"]
            assert perturbed.completions[i * PERTURBED + j] != row["completion"]


def test_language_model_reports_carry_tofu_and_muse_figures(lm, lm_data, tokenizer):
    """Before, the model has memorised the forget rows: ROUGE-L 1, PrivLeak −100, forget quality (vs held-out
    rows) 0.019; after SimNPO with `params: {}` (goal met on this fixture), measured: ROUGE-L 0, forget quality
    0.98, PrivLeak −50, model utility 0.995 → 0.991. Asserted with margins: forget quality up tenfold, ROUGE-L
    down by half, model utility within 0.1."""
    out = unlearn(
        lm, "causal_lm", "simnpo", {}, lm_data["forget"], lm_data["retain"], lm_data["holdout"], tokenizer=tokenizer
    )
    before, after = out.report["before"], out.report["after"]
    for report in (before, after):
        assert {"forget_quality", "model_utility", "forget_rouge_l_recall", "retain_rouge_l_recall", "privleak"} <= set(
            report
        )
        assert report["forget_quality_reference"] == "holdout"
    assert before["forget_rouge_l_recall"] == 1.0 and before["privleak"] == pytest.approx(-100.0)
    assert after["forget_quality"] > 10 * before["forget_quality"]
    assert after["forget_rouge_l_recall"] < before["forget_rouge_l_recall"] - 0.5
    assert after["model_utility"] > before["model_utility"] - 0.1


def test_a_retrained_reference_gives_the_gaps_and_seeds_give_mean_and_std(trained_mlp, mlp, digits):
    import copy

    reference = copy.deepcopy(trained_mlp)
    out = unlearn_job(
        mlp,
        "classifier",
        "random_label",
        {},
        digits["forget"],
        digits["retain"],
        digits["test"],
        seeds=[0, 1],
        reference_model=reference,
        reference_params={"steps": 100, "lr": 1e-2},
    )
    report = out.report
    assert out.model is mlp and report["params"]["seed"] == 0
    retrained = report["reference"]["after"]
    assert retrained["UA"] >= 90.0  # a model never trained on 3s does not recognise them
    for metric in ("UA", "RA", "TA", "MIA"):
        assert report["gap"][metric] == pytest.approx(abs(report["after"][metric] - retrained[metric]))
    assert report["gap"]["avg_gap"] == pytest.approx(np.mean([report["gap"][m] for m in ("UA", "RA", "TA", "MIA")]))
    assert report["time_vs_reference"] > 0
    seeds = report["seeds"]
    assert seeds["seeds"] == [0, 1] and len(seeds["goal_met"]) == 2
    ua = seeds["after"]["UA"]
    assert ua["values"][0] == report["after"]["UA"] and ua["mean"] == pytest.approx(np.mean(ua["values"]))
    assert ua["std"] == pytest.approx(np.std(ua["values"]))
    assert "avg_gap" in seeds["gap"]


def test_a_language_model_reference_measures_forget_quality_against_the_retrained_model(
    lm, trained_lm, lm_data, tokenizer
):
    import copy

    out = unlearn_job(
        lm,
        "causal_lm",
        "npo",
        {"lr": 1e-3, "steps": 10},
        lm_data["forget"],
        lm_data["retain"],
        lm_data["holdout"],
        tokenizer=tokenizer,
        reference_model=copy.deepcopy(trained_lm),
        reference_params={"steps": 60, "lr": 1e-2},
    )
    after = out.report["after"]
    assert after["forget_quality_reference"] == "retrain" and 0.0 <= after["forget_quality"] <= 1.0
    assert after["privleak_reference"] == "retrain"
    assert "gap" not in out.report
