"""Tuning a merge on validation data: the grid search on a tiny real model picks the point a brute-force
evaluation (dense W + ΔW written here, no hooks) picks; the contract bounds the grid."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from app.schemas.jobs import MergeJobCreate
from app.schemas.merge import MergeOutput, MergeTune, TiesParams
from workers.engines.merge.engine import merge_modules
from workers.engines.merge.tune import evaluate, grid_search, lora_applied
from workers.engines.merge.types import TaskFactors
from workers.engines.unlearn import ClassifierData

ID = "ds_" + "0" * 16


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def task_setup(model: nn.Sequential, t: int) -> tuple[dict[str, TaskFactors], ClassifierData]:
    """A rank-2 LoRA on both layers, and rows labelled by the model with that LoRA (its own score is 1)."""
    g = torch.Generator().manual_seed(100 + t)
    factors = {
        "0": TaskFactors(lora_A=torch.randn(2, 12, generator=g) * 0.6, lora_B=torch.randn(16, 2, generator=g) * 0.6),
        "2": TaskFactors(lora_A=torch.randn(2, 16, generator=g) * 0.6, lora_B=torch.randn(5, 2, generator=g) * 0.6),
    }
    x = torch.randn(300, 12, generator=g)
    with torch.no_grad():
        w0 = model[0].weight + factors["0"].lora_B @ factors["0"].lora_A
        w2 = model[2].weight + factors["2"].lora_B @ factors["2"].lora_A
        labels = (torch.tanh(x @ w0.T + model[0].bias) @ w2.T + model[2].bias).argmax(-1)
    return factors, ClassifierData.from_tensors({"inputs": x, "labels": labels})


def dense_accuracy(model: nn.Sequential, merged, data: ClassifierData) -> float:
    """W + ΔW formed densely: the brute-force path."""
    with torch.no_grad():
        w0 = model[0].weight + merged["0"].lora_B @ merged["0"].lora_A
        w2 = model[2].weight + merged["2"].lora_B @ merged["2"].lora_A
        logits = torch.tanh(data.inputs["inputs"] @ w0.T + model[0].bias) @ w2.T + model[2].bias
    return float((logits.argmax(-1) == data.labels).float().mean())


@pytest.mark.parametrize("objective", ["mean", "worst"])
def test_grid_search_picks_the_point_brute_force_picks(objective: str) -> None:
    model = tiny_model()
    setups = [task_setup(model, t) for t in range(3)]
    modules = {name: [s[0][name] for s in setups] for name in ("0", "2")}
    tune = MergeTune.model_validate(
        {"model": "md_" + "0" * 16, "validation": [{"adapter": t, "dataset": ID} for t in range(3)],
         "search": {"lambda": [0.3, 0.7, 1.0, 1.4], "density": [0.3, 0.7, 1.0]}, "objective": objective}
    )
    points = tune.points()
    assert len(points) == 12

    def merged_at(point):
        params = TiesParams.model_validate(point)
        return merge_modules("ties", modules, params, MergeOutput(rank=2)).modules

    def scorer(t):
        def score(factors):
            with lora_applied(model, factors):
                return evaluate(model, setups[t][1], "accuracy")
        return score

    seen = []
    result = grid_search(
        points,
        lambda p: {n: (m.lora_A, m.lora_B) for n, m in merged_at(p).items()},
        [(t, scorer(t)) for t in range(3)],
        {t: {n: (f.lora_A, f.lora_B) for n, f in setups[t][0].items()} for t in range(3)},
        objective,
        True,
        lambda done, total: seen.append((done, total)),
    )
    assert seen == [(i + 1, 12) for i in range(12)]
    # brute force: every point merged, W + ΔW formed densely, accuracy normalised by each own adapter's
    own = [dense_accuracy(model, setups[t][0], setups[t][1]) for t in range(3)]
    assert own == [1.0, 1.0, 1.0]
    values = []
    for point in points:
        merged = merged_at(point)
        scores = [dense_accuracy(model, merged, setups[t][1]) / own[t] for t in range(3)]
        values.append(sum(scores) / 3 if objective == "mean" else min(scores))
    best = max(range(len(points)), key=lambda i: (values[i], -i))
    assert result.best == best and result.point == points[best]
    assert [row["objective"] for row in result.table] == pytest.approx(values, abs=1e-9)
    assert len(set(values)) > 1  # the grid matters on this setup


def test_tune_contract_bounds_the_grid_and_fits_the_method() -> None:
    adapters = [{"id": "ad_" + "1" * 16}, {"id": "ad_" + "2" * 16}]
    base = {"type": "merge", "adapters": adapters, "method": "ties"}
    tune = {"model": "md_" + "0" * 16, "validation": [{"adapter": 0, "dataset": ID}], "search": {"lambda": [0.5, 1.0]}}
    assert MergeJobCreate.model_validate({**base, "tune": tune}).tune is not None
    grid = {"lambda": [0.1 * i for i in range(1, 10)], "density": [0.1 * i for i in range(1, 9)]}
    too_many = {**tune, "search": grid}
    with pytest.raises(ValidationError, match="at most 64"):
        MergeJobCreate.model_validate({**base, "tune": too_many})
    with pytest.raises(ValidationError, match="no parameter 'beta'"):
        MergeJobCreate.model_validate({**base, "tune": {**tune, "search": {"beta": [0.5]}}})
    with pytest.raises(ValidationError, match="not one of the 2 adapters"):
        MergeJobCreate.model_validate({**base, "tune": {**tune, "validation": [{"adapter": 2, "dataset": ID}]}})
    with pytest.raises(ValidationError):  # density outside [0, 1], checked by the method's own params model
        MergeJobCreate.model_validate({**base, "tune": {**tune, "search": {"density": [1.5]}}})
    ctm = MergeJobCreate.model_validate({**base, "method": "ctm", "tune": {**tune, "search": {"beta": [0, 0.5]}}})
    assert ctm.tune is not None and ctm.tune.points() == [{"beta": 0.0}, {"beta": 0.5}]


def test_a_cancel_stops_the_search_between_points() -> None:
    merged = []

    class Cancelled(Exception):
        pass

    def progress(done: int, total: int) -> None:
        if done == 2:
            raise Cancelled

    def merge_at(point):
        merged.append(point)
        return {}

    with pytest.raises(Cancelled):
        grid_search([{"lambda": v} for v in (0.5, 1.0, 1.5, 2.0)], merge_at, [(0, lambda f: 1.0)], {0: {}},
                     "mean", True, progress)
    assert merged == [{"lambda": 0.5}, {"lambda": 1.0}]
