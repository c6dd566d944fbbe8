"""`mu_mis` against a plain implementation: per-row input gradients, the gap loss, and one SGD step."""

from __future__ import annotations

import copy

import pytest
import torch

from app.schemas.unlearn import MuMisParams
from tests.workers.engines.unlearn.conftest import cpu_context
from workers.engines.unlearn import ClassifierData, UnsupportedFamily, unlearn
from workers.engines.unlearn.loop import UnlearnContext, _Trainer
from workers.engines.unlearn.mu_mis import mu_mis, sensitivity_gap_loss


def context(model, forget) -> UnlearnContext:
    return cpu_context(model, forget)


def plain_loss(model, x, y):
    """Row by row, class by class: ‖∇ₓz_y‖ − mean_{k≠y} ‖∇ₓz_k‖, averaged."""
    total = 0.0
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        logits = model(xi)[0]
        norms = []
        for k in range(logits.shape[0]):
            (g,) = torch.autograd.grad(logits[k], xi, create_graph=True)
            norms.append((g.pow(2).sum() + 1e-12).sqrt())
        s = torch.stack(norms)
        others = torch.cat([s[: y[i]], s[y[i] + 1 :]]).mean()
        total = total + (s[y[i]] - others)
    return total / x.shape[0]


def test_loss_is_zero_when_all_sensitivities_are_equal():
    s = torch.full((4, 10), 2.5)
    assert float(sensitivity_gap_loss(s, torch.arange(10), torch.tensor([0, 3, 9, 5]))) == 0.0


def test_loss_and_one_step_match_a_plain_double_backprop(mlp, digits):
    forget = digits["forget"]
    plain_model = copy.deepcopy(mlp)
    ctx = context(mlp, forget)
    params = MuMisParams(lr=0.05, steps=1, batch_size=16)
    objective = mu_mis(ctx, params)
    batch = forget.collate(range(16))
    loss = objective.forget_loss(mlp, batch, 0)
    expected = plain_loss(plain_model, batch["inputs"], batch["labels"])
    assert float(loss.detach()) > 0.0
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # one step of the shared loop: SGD (momentum, first step = lr·g), clipped at norm 1
    expected.backward()
    torch.nn.utils.clip_grad_norm_(list(plain_model.parameters()), 1.0)
    with torch.no_grad():
        for p in plain_model.parameters():
            if p.grad is not None:  # the last bias does not reach ∇ₓz
                p -= 0.05 * p.grad

    class Stream:
        data = None

        def next(self):
            return batch

    trainer = _Trainer(ctx, objective, params, 0.05, 1)
    trainer.forget = Stream()
    trainer.step(0)
    for (name, p), q in zip(mlp.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_mu_mis_lowers_forget_accuracy_without_retain_rows(mlp, digits):
    params = {"lr": 0.05, "steps": 30, "batch_size": 32}
    out = unlearn(mlp, "classifier", "mu_mis", params, digits["forget"], None, digits["test"])
    before, after = out.report["before"], out.report["after"]
    assert after["forget_accuracy"] < before["forget_accuracy"] - 30.0, after


def test_mu_mis_refuses_token_inputs(mlp):
    ids = ClassifierData({"input_ids": torch.zeros(8, 5, dtype=torch.long)}, torch.arange(8) % 2)
    with pytest.raises(UnsupportedFamily, match="no recipe"):
        mu_mis(context(mlp, ids), MuMisParams())


def test_double_backprop_through_scaled_dot_product_attention():
    """A ViT's fused CPU attention has no double backward; mu_mis runs attention on the math path."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, attn_implementation="sdpa",
    )
    model = ViTForImageClassification(config)
    forget = ClassifierData({"pixel_values": torch.rand(6, 1, 8, 8)}, torch.tensor([0, 1, 2, 0, 1, 2]))
    objective = mu_mis(context(model, forget), MuMisParams())
    loss = objective.forget_loss(model, forget.collate(range(6)), 0)
    loss.backward()
    assert all(p.grad is not None for p in model.vit.embeddings.patch_embeddings.parameters())
