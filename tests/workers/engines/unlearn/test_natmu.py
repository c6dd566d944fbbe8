"""`natmu` against a plain implementation: masks, targets, hybrids, the loss and one update step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from app.schemas.unlearn import NatmuParams
from tests.workers.engines.unlearn.conftest import cpu_context
from workers.engines.unlearn import ClassifierData, UnsupportedFamily, unlearn
from workers.engines.unlearn.loop import UnlearnContext
from workers.engines.unlearn.natmu import natmu, natmu_masks, pick_targets, rebalance


def context(model, forget, retain) -> UnlearnContext:
    return cpu_context(model, forget, retain)


def test_masks_are_tent_and_v_profiles():
    masks = natmu_masks(8, 8, 0.0)
    tent = torch.tensor([0, 0.25, 0.5, 0.75, 0.75, 0.5, 0.25, 0])
    assert torch.allclose(masks[0][:, 3], tent) and torch.allclose(masks[0][2], torch.full((8,), 0.5))
    assert torch.allclose(masks[1][3], tent)
    assert torch.allclose(masks[2][:, 0], (0.75 - tent).clamp(0, 1))
    assert torch.allclose(masks[3][0], (0.75 - tent).clamp(0, 1))
    shifted = natmu_masks(8, 8, -0.19)
    assert torch.allclose(shifted, (masks + -0.19).clamp(0, 1))


def test_targets_skip_the_true_class_and_classes_without_retain_rows():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04], [0.1, 0.2, 0.3, 0.35, 0.05]])
    allowed = torch.tensor([True, True, False, True, True])
    targets = pick_targets(probs, torch.tensor([0, 3]), allowed, 2)
    assert targets.tolist() == [[1, 3], [1, 0]]


def test_rebalance_moves_excess_to_an_under_used_class():
    targets = torch.tensor([[1], [1], [1], [1]])
    out = rebalance(
        targets, torch.tensor([0, 0, 0, 0]), torch.tensor([False, True, True]), n_retain=6, generator=torch.Generator()
    )
    # n̄ = 2: class 1 may keep floor(0.98·2) = 1 choice; class 2 (0 < 0.8) receives the excess
    assert sorted(out.reshape(-1).tolist()) == [1, 2, 2, 2]


def _plain_step(model, hybrid_batch, retain_batch, w_h, w_r, lr):
    """One AdamW step (weight decay 2e-3) on w_h·CE(hybrids) + w_r·CE(retain), clipped at norm 1."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=2e-3)
    loss = w_h * F.cross_entropy(model(hybrid_batch["inputs"]), hybrid_batch["labels"]) + w_r * F.cross_entropy(
        model(retain_batch["inputs"]), retain_batch["labels"]
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    optimizer.step()
    return float(loss.detach())


def test_hybrids_loss_and_one_step_match_a_plain_implementation(mlp, digits):
    forget, retain = digits["forget"], digits["retain"]
    reference = copy.deepcopy(mlp)
    ctx = context(mlp, forget, retain)
    objective = natmu(ctx, NatmuParams(rebalance=False))
    mixed = objective.forget_data
    assert len(mixed) == 4 * len(forget)
    # plain: each hybrid row is M_k⊙x_f + (1−M_k)⊙x_r for some retain image of its label
    masks = natmu_masks(8, 8, -0.19).reshape(4, 64)
    with torch.no_grad():
        probs = reference(forget.inputs["inputs"]).softmax(-1)
    probs[:, 3] = -1
    top4 = probs.topk(4, dim=1).indices
    assert torch.equal(mixed.labels.view(-1, 4), top4)
    for i in range(0, len(forget), 7):
        for k in range(4):
            row = mixed.inputs["inputs"][4 * i + k]
            x_r = (row - masks[k] * forget.inputs["inputs"][i]) / (1 - masks[k]).clamp_min(1e-6)
            keep = masks[k] < 0.99
            pool = retain.inputs["inputs"][retain.labels == top4[i, k]]
            assert ((pool[:, keep] - x_r[keep]).abs().max(dim=1).values < 1e-4).any()
    # the loss: share-weighted CEs of a hybrid batch and a retain batch
    hybrid_batch, retain_batch = mixed.collate(range(32)), retain.collate(range(32))
    w_h = len(mixed) / (len(mixed) + len(retain))
    loss = objective.forget_loss(mlp, hybrid_batch, 0) + objective.retain_loss(mlp, retain_batch, 0)
    plain = copy.deepcopy(reference)
    expected = _plain_step(plain, hybrid_batch, retain_batch, w_h, 1 - w_h, 1e-3)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    # one step through the shared loop equals the plain step
    from workers.engines.unlearn.loop import _Trainer

    class Stream:
        def __init__(self, batch):
            self.batch, self.data = batch, None

        def next(self):
            return self.batch

    trainer = _Trainer(ctx, objective, NatmuParams(rebalance=False, lr=1e-3, lr_schedule="constant"), 1e-3, 1)
    trainer.forget, trainer.retain = Stream(hybrid_batch), Stream(retain_batch)
    mlp.train()
    trainer.step(0)
    for (name, p), q in zip(mlp.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_natmu_forgets_the_class_and_keeps_retain(mlp, digits):
    params = {"lr": 3e-3, "steps": 60, "batch_size": 64}
    out = unlearn(mlp, "classifier", "natmu", params, digits["forget"], digits["retain"], digits["test"])
    before, after = out.report["before"], out.report["after"]
    assert after["forget_accuracy"] < before["forget_accuracy"] - 30.0, after
    assert after["RA"] > before["RA"] - 10.0, after


def test_natmu_refuses_text_classifiers(mlp):
    ids = ClassifierData({"input_ids": torch.zeros(8, 5, dtype=torch.long)}, torch.arange(8) % 2)
    with pytest.raises(UnsupportedFamily, match="no recipe"):
        natmu(context(mlp, ids, ids), NatmuParams())
