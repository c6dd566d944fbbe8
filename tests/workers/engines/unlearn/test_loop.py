"""The shared loop and the entry point: cancellation, progress, typed refusals."""

from __future__ import annotations

import pytest
import torch

from workers.engines.unlearn import MissingInput, UnlearnCancelled, UnlearnError, UnsupportedFamily, unlearn


def test_cancellation_stops_between_steps(mlp, digits):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 3

    before = [p.detach().clone() for p in mlp.parameters()]
    with pytest.raises(UnlearnCancelled) as error:
        unlearn(
            mlp,
            "classifier",
            "finetune",
            {"steps": 1000},
            digits["forget"],
            digits["retain"],
            should_cancel=should_cancel,
        )
    assert error.value.steps_done == 3
    assert len(calls) == 4
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, mlp.parameters(), strict=True))


def test_cancellation_before_an_edit(mlp, digits):
    with pytest.raises(UnlearnCancelled):
        unlearn(mlp, "classifier", "ssd", {}, digits["forget"], digits["retain"], should_cancel=lambda: True)


def test_progress_is_monotone_and_finishes(mlp, digits):
    seen: list[tuple[float, str]] = []
    unlearn(
        mlp,
        "classifier",
        "grad_ascent",
        {"steps": 7, "lr": 1e-4},
        digits["forget"],
        None,
        progress=lambda fraction, stage: seen.append((fraction, stage)),
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] == 0.0
    assert {"evaluating", "unlearning", "done"} <= {stage for _, stage in seen}


def test_refusals_are_typed(mlp, digits, lm, lm_data, tokenizer):
    with pytest.raises(MissingInput):
        unlearn(mlp, "classifier", "salun", {}, digits["forget"], None)
    with pytest.raises(MissingInput):
        unlearn(mlp, "classifier", "grad_ascent", {"gu": True}, digits["forget"], None)
    with pytest.raises(UnsupportedFamily):
        unlearn(mlp, "classifier", "npo", {}, digits["forget"], digits["retain"])
    with pytest.raises(UnsupportedFamily):
        unlearn(lm, "causal_lm", "salun", {}, lm_data["forget"], lm_data["retain"], tokenizer=tokenizer)
    with pytest.raises(UnlearnError):
        unlearn(mlp, "classifier", "finetune", {"steps": 0}, digits["forget"], digits["retain"])
    with pytest.raises(UnlearnError):
        unlearn(mlp, "classifier", "finetune", {"bogus": 1}, digits["forget"], digits["retain"])
    with pytest.raises(UnlearnError):
        unlearn(lm, "causal_lm", "npo", {}, digits["forget"], digits["retain"])
    with pytest.raises(UnlearnError):
        unlearn(lm, "causal_lm", "rmu", {"layer": 5}, lm_data["forget"], lm_data["retain"], tokenizer=tokenizer)


def test_report_shape(mlp, digits):
    out = unlearn(mlp, "classifier", "finetune", {"steps": 3}, digits["forget"], digits["retain"], digits["test"])
    report = out.report
    assert out.model is mlp
    assert report["method"] == "finetune" and report["steps"] == 3 and report["seconds"] > 0
    assert report["params"]["steps"] == 3
    assert {"UA", "RA", "TA", "MIA", "forget_loss"} <= report["before"].keys() <= report["after"].keys() | set()
