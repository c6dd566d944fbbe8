"""GU: the projected forget gradient is orthogonal to every retain gradient."""

from __future__ import annotations

import torch

from tests.workers.engines.unlearn.conftest import cpu_context
from workers.engines.unlearn import unlearn
from workers.engines.unlearn.gu import kept_fraction, orthonormal_basis, project_off


def test_projection_is_orthogonal_to_every_retain_gradient():
    generator = torch.Generator().manual_seed(0)
    retain = [torch.randn(500, generator=generator) for _ in range(6)]
    forget = torch.randn(500, generator=generator)
    projected = project_off(forget, orthonormal_basis(retain))
    for vector in retain:
        assert abs(float(projected.double() @ vector.double())) < 1e-8 * float(vector.norm() * forget.norm())
    # what is removed lies in the span: projecting twice changes nothing
    assert torch.allclose(project_off(projected, orthonormal_basis(retain)), projected, atol=1e-6)
    assert 0.0 < kept_fraction(forget, projected) < 1.0


def test_dependent_directions_are_dropped():
    a, b = torch.randn(50), torch.randn(50)
    basis = orthonormal_basis([a, b, a + 2 * b, 3 * a, torch.zeros(50)])
    assert basis.shape[0] == 2
    assert torch.allclose(basis @ basis.T, torch.eye(2, dtype=basis.dtype), atol=1e-10)


def test_gradient_in_the_span_is_removed_entirely():
    a, b = torch.randn(20), torch.randn(20)
    projected = project_off(0.5 * a - b, orthonormal_basis([a, b]))
    assert float(projected.norm()) < 1e-5
    assert kept_fraction(0.5 * a - b, projected) < 1e-5


def test_gu_runs_in_the_loop_and_reports_the_kept_fraction(lm, lm_data, tokenizer):
    out = unlearn(
        lm,
        "causal_lm",
        "npo",
        {"lr": 1e-3, "steps": 5, "gu": True, "gu_retain_samples": 3},
        lm_data["forget"],
        lm_data["retain"],
        tokenizer=tokenizer,
    )
    assert 0.0 < out.report["gu_kept_fraction"] <= 1.0


def test_the_loop_steps_orthogonally_to_every_retain_sample(lm, lm_data, tokenizer):
    """Inside the loop: the forget gradient the optimiser gets is orthogonal to the task-loss gradient of each
    row of the step's retain batch (4 rows, gu_retain_samples=4), taken in train mode as the reference does."""
    from app.schemas.unlearn import NpoParams
    from workers.engines.registry import get
    from workers.engines.unlearn.loop import _flat, _grads, _Trainer

    retain = lm_data["retain"].subset(range(4))
    params = NpoParams(lr=1e-3, steps=1, gu=True, gu_retain_samples=4)
    ctx = cpu_context(lm, lm_data["forget"], retain, tokenizer, "causal_lm")
    trainer = _Trainer(ctx, get("unlearn", "npo").function(ctx, params), params, lr=1e-3, horizon=1)
    lm.train()
    batch = retain.collate(range(4))
    projected = _flat(trainer._forget_grads(0, None, lambda: batch))
    assert 0.0 < trainer.kept[0] < 1.0
    for row in range(4):
        g = _flat(_grads(ctx.task_loss(lm, retain.collate([row])), trainer.parameters))
        cosine = float(projected.double() @ g.double()) / float(projected.double().norm() * g.double().norm())
        assert abs(cosine) < 1e-4, cosine
