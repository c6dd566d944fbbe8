"""`ug_clu` (continual learn-and-unlearn) against a plain implementation — the balanced mask, the losses and one
slow + fast iteration — and a continual job on a tiny digits classifier that has never seen a 9: it learns the
9s while it forgets the 3s and keeps the other digits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from app.schemas.unlearn import UgCluParams, UnlearnGoal
from workers.engines.unlearn import ClassifierData, MissingInput, UnlearnError, unlearn
from workers.engines.unlearn.goal import GoalCheck
from workers.engines.unlearn.loop import UnlearnContext, _Trainer
from workers.engines.unlearn.protocol import unlearn_job
from workers.engines.unlearn.ug_clu import ug_clu

from .conftest import MLP, cpu_context, fit_mlp

EPS = 1e-15


@pytest.fixture(scope="module")
def rows(digits) -> dict[str, ClassifierData]:
    """The digits training split as a continual job sees it: forget the 3s, learn the 9s, keep the rest."""
    train = digits["train"]
    labels = train.labels
    pick = lambda keep: train.subset(keep.nonzero().squeeze(1))  # noqa: E731
    return {
        "forget": pick(labels == 3),
        "learn": pick(labels == 9),
        "retain": pick((labels != 3) & (labels != 9)),
        "old": pick(labels != 9),
        "test": digits["test"],
    }


@pytest.fixture(scope="module")
def trained_without_nines(rows) -> MLP:
    """The conftest MLP's recipe on every training digit but the 9s: a model that has never learned a 9."""
    return fit_mlp(rows["old"])


@pytest.fixture
def model(trained_without_nines) -> MLP:
    return copy.deepcopy(trained_without_nines)


def context(model, rows, horizon: int = 1) -> UnlearnContext:
    return cpu_context(model, rows["forget"], rows["retain"], horizon=horizon, learn=rows["learn"])


def plain_fisher(model, data: ClassifierData, batch: int, cap: int = 64) -> list[torch.Tensor]:
    """Mean over (at most `cap`) ordered batches of the squared gradient of the batch's mean CE, in eval mode."""
    model.eval()
    total = [torch.zeros_like(p) for p in model.parameters()]
    starts = list(range(0, len(data), batch))[:cap]
    for start in starts:
        part = data.collate(range(start, min(start + batch, len(data))))
        grads = torch.autograd.grad(F.cross_entropy(model(part["inputs"]), part["labels"]), list(model.parameters()))
        total = [t + g**2 for t, g in zip(total, grads, strict=True)]
    return [t / len(starts) for t in total]


def test_balanced_mask_is_the_union_of_the_forget_and_learn_saliency_masks(model, rows):
    params = UgCluParams(gamma=2.0)
    objective = ug_clu(context(model, rows), params)
    f_r = plain_fisher(model, rows["retain"], 32)
    f_u = plain_fisher(model, rows["forget"], 32)
    f_l = plain_fisher(model, rows["learn"], 32)
    names = [name for name, _ in model.named_parameters()]
    for name, r, u, learn in zip(names, f_r, f_u, f_l, strict=True):
        m_u = (u + EPS) / (r + EPS) >= 2.0
        m_l = (learn + EPS) / (r + EPS) >= 2.0
        assert torch.equal(objective.forget_mask[name].bool(), m_u | m_l), name
    # the two masks differ (else the union would test nothing): the 9s' head row is salient for learning only
    report = objective.report
    assert report["learn_mask_fraction"] != report["forget_mask_fraction"]
    assert report["mask_fraction"] >= max(report["learn_mask_fraction"], report["forget_mask_fraction"])
    assert report["learn_rows"] == len(rows["learn"])


def _clip(grads: list[torch.Tensor], limit: float) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    return [g * min(1.0, limit / (float(norm) + 1e-6)) for g in grads]


class Stream:
    def __init__(self, batch):
        self.batch, self.data = batch, None

    def next(self):
        return self.batch


def test_losses_and_one_slow_plus_fast_iteration_match_a_plain_implementation(model, rows):
    params = UgCluParams(lr=0.01, steps=10, lr_schedule="constant", learn_weight=0.7, forget_clip=0.5)
    reference = copy.deepcopy(model)
    ctx = context(model, rows, horizon=10)
    objective = ug_clu(ctx, params)
    assert len(objective.retain_data) == len(rows["retain"]) + len(rows["learn"])  # fast steps replay both
    forget_batch, learn_batch = rows["forget"].collate(range(32)), rows["learn"].collate(range(32))
    retain_batch = objective.retain_data.collate(range(len(rows["retain"]) - 16, len(rows["retain"]) + 16))
    # losses at step 0 (α_0 = α0) and step 5 (α_5 = α0·½(1 + cos(π/2)))
    losses = F.cross_entropy(reference(forget_batch["inputs"]), forget_batch["labels"], reduction="none")
    weights = 1.0 / (losses.detach() ** 0.5 + 1e-15)
    weights = weights * (32 / weights.sum())
    ascent = -(weights * losses).mean().detach()
    model.train()

    def value(loss, batch, step):
        return float(loss(model, batch, step).detach())

    assert value(objective.forget_loss, forget_batch, 0) == pytest.approx(25.0 * float(ascent), rel=1e-5)
    halfway = 25.0 * 0.5 * (1 + math.cos(math.pi * 5 / 10))
    assert value(objective.forget_loss, forget_batch, 5) == pytest.approx(halfway * float(ascent), rel=1e-5)
    learn_ce = F.cross_entropy(reference(learn_batch["inputs"]), learn_batch["labels"]).detach()
    assert value(objective.learn_loss, learn_batch, 0) == pytest.approx(0.7 * float(learn_ce), rel=1e-6)

    # the plain iteration 0: a slow step (masked ascent and masked learning, each clipped at 0.5, summed), then
    # a fast step (unmasked, unclipped CE on a batch of retain ∪ learn rows); SGD momentum 0.9, weight decay 5e-4
    mask = [objective.forget_mask[name] for name, _ in reference.named_parameters()]
    parameters = list(reference.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9, weight_decay=5e-4)
    reference.train()
    losses = F.cross_entropy(reference(forget_batch["inputs"]), forget_batch["labels"], reduction="none")
    weights = 1.0 / (losses.detach() ** 0.5 + 1e-15)
    g_u = torch.autograd.grad(-25.0 * (weights * (32 / weights.sum()) * losses).mean(), parameters)
    learn_loss = 0.7 * F.cross_entropy(reference(learn_batch["inputs"]), learn_batch["labels"])
    g_l = torch.autograd.grad(learn_loss, parameters)
    slow = [a + b for a, b in zip(_clip([g * m for g, m in zip(g_u, mask, strict=True)], 0.5),
                                  _clip([g * m for g, m in zip(g_l, mask, strict=True)], 0.5), strict=True)]
    for p, g in zip(parameters, slow, strict=True):
        p.grad = g
    optimizer.step()
    fast = torch.autograd.grad(F.cross_entropy(reference(retain_batch["inputs"]), retain_batch["labels"]), parameters)
    for p, g in zip(parameters, fast, strict=True):
        p.grad = g
    optimizer.step()

    trainer = _Trainer(ctx, objective, params, 0.01, 10)
    trainer.forget, trainer.learn, trainer.retain = Stream(forget_batch), Stream(learn_batch), Stream(retain_batch)
    trainer.step(0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_a_continual_job_learns_the_new_class_forgets_the_old_one_and_keeps_the_rest(model, rows):
    params = {"steps": 300, "lr": 0.05, "alpha0": 1.0}
    out = unlearn(model, "classifier", "ug_clu", params, rows["forget"], rows["retain"], rows["test"],
                  learn=rows["learn"])
    before, after = out.report["before"], out.report["after"]
    assert before["learn_accuracy"] <= 5.0 and before["forget_accuracy"] >= 90.0, before  # never saw a 9
    assert after["learn_accuracy"] >= 80.0, after  # measured 98.6
    assert after["forget_accuracy"] <= 15.0, after  # measured 0
    assert after["retain_accuracy"] >= before["retain_accuracy"] - 6.0, after  # measured −1.9 points
    # the goal's conditions name the learn rows: class-wise forgetting (no retain or learn row is a 3)
    final = out.report["goal"]["final"]
    assert out.report["goal"]["kind"] == "class-wise"
    assert final["targets"]["learn_error"] == pytest.approx(100.0 - (before["retain_accuracy"] - 2.0), abs=1.0)


def test_goal_driven_continual_run_counts_the_learn_rows_in_its_goal(model, rows):
    goal = {"retain_accuracy_drop": 5.0, "learn_accuracy": 90.0}
    out = unlearn(model, "classifier", "ug_clu", {"lr": 0.05, "alpha0": 1.0}, rows["forget"], rows["retain"],
                  rows["test"], learn=rows["learn"], goal=goal)
    verdict = out.report["goal"]
    assert verdict["learn_target"] == 90.0 and verdict["final"]["targets"]["learn_error"] == pytest.approx(10.0)
    after = out.report["after"]
    # met means every condition held on the full splits, the learn rows' included
    assert verdict["met"] == (after["learn_accuracy"] >= 90.0 and after["forget_accuracy"] <= 10.0
                              and verdict["final"]["goal_met"] and verdict["final"]["guards_ok"])
    assert after["learn_accuracy"] >= 50.0, after


def test_learned_means_at_or_above_the_target(model, rows):
    cpu = torch.device("cpu")
    goal = UnlearnGoal(learn_accuracy=50.0)
    check = GoalCheck.build(model, "classifier", rows["forget"], rows["retain"], rows["test"], goal, 0, cpu,
                            learn=rows["learn"])
    start = check.begin(model)
    learn_condition = [(value, target) for name, value, target in start.conditions if name == "learn_error"]
    assert learn_condition == [(pytest.approx(100.0), 50.0)]  # 100 − 0 % learned, target 100 − 50
    assert not start.goal_met and "learn_error 100.00 > 50.00" in start.unmet
    # by default: the retain accuracy the run started from, minus the guard's drop
    default = GoalCheck.build(model, "classifier", rows["forget"], rows["retain"], rows["test"], UnlearnGoal(), 0,
                              cpu, learn=rows["learn"])
    default.begin(model)
    assert default.learn_target(default.start["full"]) == pytest.approx(default.start["full"]["retain_accuracy"] - 2)
    # learn rows that carry a forget label make the forgetting random, not class-wise (the class stays)
    mixed = GoalCheck.build(model, "classifier", rows["forget"], rows["retain"], rows["test"], goal, 0, cpu,
                            learn=rows["forget"].subset([0, 1]))
    assert check.kind == "class-wise" and mixed.kind == "random"


def test_learn_rows_are_for_ug_clu_only_and_ug_clu_needs_them(model, rows):
    data = (rows["forget"], rows["retain"], rows["test"])
    with pytest.raises(UnlearnError, match="takes no learn rows"):
        unlearn(copy.deepcopy(model), "classifier", "sfron", {"steps": 1}, *data, learn=rows["learn"])
    with pytest.raises(MissingInput, match="learn"):
        unlearn(copy.deepcopy(model), "classifier", "ug_clu", {"steps": 1}, *data)


def test_the_reference_retrains_on_retain_and_learn_rows(model, rows):
    fresh = MLP()
    out = unlearn_job(model, "classifier", "ug_clu", {"steps": 20, "lr": 0.05, "alpha0": 1.0}, rows["forget"],
                      rows["retain"], rows["test"], learn=rows["learn"], reference_model=fresh,
                      reference_params={"steps": 150, "lr": 1e-2})
    retrained = out.report["reference"]["after"]
    # a model retrained on the retain rows alone never predicts a 9; on retain ∪ learn it does
    assert retrained["learn_accuracy"] >= 50.0, retrained
    assert retrained["forget_accuracy"] == 0.0 and "avg_gap" in out.report["gap"]


def test_joined_rows_pad_token_inputs_to_the_longer_length():
    from workers.engines.unlearn.data import joined

    short = ClassifierData({"input_ids": torch.ones(2, 3, dtype=torch.long),
                            "attention_mask": torch.ones(2, 3, dtype=torch.long)}, torch.tensor([0, 1]))
    long = ClassifierData({"input_ids": torch.full((1, 5), 7), "attention_mask": torch.ones(1, 5, dtype=torch.long)},
                          torch.tensor([2]))
    both = joined(short, long)
    assert both.inputs["input_ids"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [7, 7, 7, 7, 7]]
    assert both.inputs["attention_mask"].sum(dim=1).tolist() == [3, 3, 5] and both.labels.tolist() == [0, 1, 2]
    images = ClassifierData({"pixel_values": torch.zeros(1, 1, 2, 2)}, torch.tensor([0]))
    with pytest.raises(UnlearnError, match="cannot be joined"):
        joined(images, ClassifierData({"pixel_values": torch.zeros(1, 1, 3, 3)}, torch.tensor([0])))
