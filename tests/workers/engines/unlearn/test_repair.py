"""The repair phase of a goal-driven run (`UnlearnGoal.repair_steps`): once the goal is met, the retain term alone
trains at a tenth of the run's rate, and a state is kept only while the goal still holds and the guards gain room.

The language-model fixture (conftest): 8 forget rows, 24 retain rows, 8 held-out rows; the checks' subsets are the
whole splits (fewer rows than `eval_rows`), so what a check keeps is what the final verdict measures.
"""

from __future__ import annotations

import copy

from workers.engines.unlearn import unlearn


def _run(model, data, tokenizer, method: str, repair_steps: int):
    return unlearn(model, "causal_lm", method, {"seed": 0}, data["forget"], data["retain"], data["holdout"],
                   tokenizer=tokenizer, goal={"repair_steps": repair_steps})


def test_repair_lowers_the_retain_nll_and_keeps_the_goal(lm, lm_data, tokenizer):
    plain = _run(copy.deepcopy(lm), lm_data, tokenizer, "simnpo", 0)
    repaired = _run(lm, lm_data, tokenizer, "simnpo", 40)
    assert plain.report["goal_met"] is True and "repair_steps" not in plain.report["loop"]
    loop = repaired.report["loop"]
    assert repaired.report["goal_met"] is True, repaired.report["goal"]  # the full splits: still forgotten
    assert 0 < loop["repair_kept_steps"] <= loop["repair_steps"] <= 40
    # the same run up to the goal (same seed and rate), then repaired: less retain damage, forget still below
    assert repaired.report["goal"]["lr"] == plain.report["goal"]["lr"]
    assert repaired.report["after"]["retain_nll"] < plain.report["after"]["retain_nll"]
    after = repaired.report["after"]
    assert after["forget_token_exact_match"] <= after["holdout_token_exact_match"]


def test_a_method_without_a_retain_term_is_not_repaired(lm, lm_data, tokenizer):
    out = _run(lm, lm_data, tokenizer, "grad_ascent", 40)
    assert "repair_steps" not in out.report["loop"]
