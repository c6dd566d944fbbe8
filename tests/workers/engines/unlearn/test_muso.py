"""`muso`: the linear theorem as a known answer, and the deep-net objective against a plain implementation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from app.schemas.unlearn import MusoParams
from tests.workers.engines.unlearn.conftest import cpu_context
from workers.engines.unlearn import unlearn
from workers.engines.unlearn.loop import _Trainer
from workers.engines.unlearn.muso import muso, relabel, soft_targets


def sgd(theta, phi, y, epochs, batch, generator):
    """Plain minibatch SGD on ½‖Φθ − y‖² per batch, from `theta`, with a step safe for every batch."""
    theta = theta.clone()
    lr = 1.0 / max(float(torch.linalg.matrix_norm(phi[i : i + batch], 2)) ** 2 for i in range(len(phi)))
    for _ in range(epochs):
        order = torch.randperm(len(phi), generator=generator)
        for i in range(0, len(phi), batch):
            rows = order[i : i + batch]
            theta -= lr * phi[rows].T @ (phi[rows] @ theta - y[rows])
    return theta


def test_relabel_and_finetune_reproduces_the_retrained_linear_model():
    generator = torch.Generator().manual_seed(0)
    n, p, n_forget = 60, 400, 10
    phi = torch.randn(n, p, generator=generator, dtype=torch.float64) / p**0.5
    y = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    theta0 = torch.randn(p, 3, generator=generator, dtype=torch.float64) * 0.1
    forget, retain = slice(0, n_forget), slice(n_forget, n)
    trained = sgd(theta0, phi, y, 400, 10, generator)  # θ*: on D
    retrained = sgd(theta0, phi[retain], y[retain], 400, 10, generator)  # θ_r: on D_r, from the same start
    relabels = relabel(phi[forget], phi[retain], y[retain], 0.0, phi[forget] @ theta0, phi[retain] @ theta0)
    assert torch.allclose(relabels, phi[forget] @ retrained, atol=1e-8)  # the retrained model's predictions
    unlearned = sgd(trained, phi, torch.cat([relabels, y[retain]]), 400, 10, generator)
    error = float((unlearned - retrained).norm() / retrained.norm())
    assert error < 1e-6
    # negative control: fine-tuning on the relabelled forget rows alone does not get there
    alone = sgd(trained, phi[forget], relabels, 400, 10, generator)
    assert float((alone - retrained).norm() / retrained.norm()) > 1e-2


def test_soft_targets_clip_and_normalise():
    out = soft_targets(torch.tensor([[0.5, -0.2, 1.5], [-1.0, -2.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[0.25, 0.0, 0.75], [1 / 3, 1 / 3, 1 / 3]]))


def test_objective_loss_and_one_step_match_a_plain_kernel_regression(mlp, digits):
    forget, retain = digits["forget"], digits["retain"]
    plain_model = copy.deepcopy(mlp)
    ctx = cpu_context(mlp, forget, retain)
    params = MusoParams(lr=0.05, relabel_rows=5000, ridge=1e-3)  # m ≥ |D_r|: every retain row
    objective = muso(ctx, params)
    # plain: features relu(W1 x + b1) and a bias column, kernel ridge on one-hot retain labels
    with torch.no_grad():
        hidden = lambda x: torch.cat([torch.relu(plain_model.net[0](x)), torch.ones(len(x), 1)], 1).double()  # noqa: E731
        phi_f, phi_r = hidden(forget.inputs["inputs"]), hidden(retain.inputs["inputs"])
        k_rr = phi_r @ phi_r.T
        lam = 1e-3 * float(torch.trace(k_rr)) / len(phi_r)
        y_r = F.one_hot(retain.labels, 10).double()
        relabels = phi_f @ phi_r.T @ torch.linalg.solve(k_rr + lam * torch.eye(len(phi_r), dtype=torch.float64), y_r)
    targets = soft_targets(relabels.float())
    w_f = len(forget) / (len(forget) + len(retain))
    rows = torch.arange(8)
    forget_batch = {"inputs": forget.inputs["inputs"][rows], "labels": rows}
    retain_batch = retain.collate(range(8))
    loss = objective.forget_loss(mlp, forget_batch, 1) + objective.retain_loss(mlp, retain_batch, 1)
    expected = w_f * -(targets[rows] * plain_model(forget_batch["inputs"]).log_softmax(-1)).sum(1).mean() + (
        1 - w_f
    ) * F.cross_entropy(plain_model(retain_batch["inputs"]), retain_batch["labels"])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    assert objective.report["relabelled_as_true_class"] == 0.0  # no retain row is a 3: never relabelled as one
    # one step of the shared loop (SGD with momentum: the first step is lr·g; clipped at norm 1)
    expected.backward()
    torch.nn.utils.clip_grad_norm_(list(plain_model.parameters()), 1.0)
    with torch.no_grad():
        for p in plain_model.parameters():
            p -= 0.05 * p.grad

    class Stream:
        def __init__(self, batch):
            self.batch, self.data = batch, None

        def next(self):
            return self.batch

    trainer = _Trainer(ctx, objective, params, 0.05, 1)
    trainer.forget, trainer.retain = Stream(forget_batch), Stream(retain_batch)
    trainer.step(1)
    for (name, p), q in zip(mlp.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


def test_muso_forgets_the_class_and_keeps_retain(mlp, digits):
    params = {"lr": 0.05, "steps": 60, "batch_size": 32, "relabel_every": 20}
    out = unlearn(mlp, "classifier", "muso", params, digits["forget"], digits["retain"], digits["test"])
    before, after = out.report["before"], out.report["after"]
    assert after["forget_accuracy"] < before["forget_accuracy"] - 30.0, after
    assert after["RA"] > before["RA"] - 10.0, after
    assert out.report["loop"]["relabels"] == 3
