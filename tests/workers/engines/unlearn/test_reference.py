"""Methods against small plain implementations of their reference code, written here from the references:

- FLAT: `UCSC-REAL/FLAT:dataloader.py` (`ProbLossStable`, `get_contrastive_loss`), each divergence;
- SFR-on: `K1nght/Unified-Unlearning-w-Remain-Geometry:Classification/unlearn/sfron.py` (Fisher mask, AdaGA,
  clipping of the forget step only);
- SalUn: `OPTML-Group/Unlearn-Saliency:Classification/unlearn/RL.py` + `generate_mask.py` (a forget pass, then
  a retain pass, both masked, masked-out weights reset to θ0);
- GU: `Lemutisme/geo-unlearning:src/trainer/unlearn/orthograd.py` (the basis is the step's retain batch, per
  sample, in train mode; here the projection follows the mask);
- the two exact matches on a model whose predictions are known.

Full-batch data (batch size ≥ every split) makes the batch order irrelevant, so the plain loops see the same
rows; where the engine draws random labels, the plain loop makes the same seeded draws in the same order.
Tolerances are float32 summation-order noise (rows inside a batch come permuted): measured ≤ 1e-6 here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.schemas.unlearn import FlatParams, GradAscentParams
from tests.workers.engines.unlearn.conftest import cpu_context
from workers.engines.registry import get
from workers.engines.unlearn import ClassifierData, LMData, unlearn
from workers.engines.unlearn.data import TemplatedLMData
from workers.engines.unlearn.loop import UnlearnContext, _flat, _Trainer
from workers.engines.unlearn.metrics import lm_report


def context(model, forget, retain, tokenizer=None, family="classifier") -> UnlearnContext:
    return cpu_context(model, forget, retain, tokenizer, family)


@pytest.fixture
def small(digits):
    """8 forget rows (class 3) and 24 retain rows (other classes) of the digits fixture."""
    return digits["forget"].subset(range(8)), digits["retain"].subset(range(24))


# -- FLAT ---------------------------------------------------------------------------------------------------


def plain_mean_probability(model, rows: LMData) -> torch.Tensor:
    """ProbLossStable: softmax probability of each answer token, averaged over the row's answer, then the batch."""
    means = []
    for ids, labels in zip(rows.input_ids, rows.labels, strict=True):
        probs = model(input_ids=ids[None]).logits[0].softmax(-1)
        picked = [probs[t, labels[t + 1]] for t in range(len(labels) - 1) if labels[t + 1] != -100]
        means.append(torch.stack(picked).mean())
    return torch.stack(means).mean()


REFERENCE_FLAT = {  # activation(P̄_e) − conjugate(P̄_f), as get_contrastive_loss writes each pair
    "total_variation": lambda e, f: -torch.tanh(e) / 2.0 - (-torch.tanh(f) / 2.0),
    "kl": lambda e, f: -e - (-torch.exp(f - 1.0)),
    "jensen_shannon": lambda e, f: (
        (torch.log(1.0 + torch.exp(-e)) - math.log(2.0)) - (-(f + torch.log(1.0 + torch.exp(-f))) + math.log(2.0))
    ),
    "pearson": lambda e, f: -e - (-(f * f / 4.0 + f)),
}


@pytest.mark.parametrize("divergence", sorted(REFERENCE_FLAT))
def test_flat_is_the_reference_contrastive_loss(divergence, lm, lm_data, tokenizer):
    forget = lm_data["forget"]
    params = FlatParams(divergence=divergence, template="I don't know.")
    objective = get("unlearn", "flat").function(context(lm, forget, None, tokenizer, "causal_lm"), params)
    ours = objective.forget_loss(lm, objective.forget_data.collate(range(len(forget))), 0)
    template = forget.with_completion("I don't know.")
    expected = REFERENCE_FLAT[divergence](plain_mean_probability(lm, template), plain_mean_probability(lm, forget))
    assert float(ours) == pytest.approx(float(expected), abs=1e-5)


def test_flat_defaults_to_total_variation_and_draws_a_template_per_row(lm, lm_data, tokenizer):
    params = FlatParams()
    assert params.divergence == "total_variation" and len(params.templates) > 1
    forget = lm_data["forget"]
    objective = get("unlearn", "flat").function(context(lm, forget, None, tokenizer, "causal_lm"), params)
    data = objective.forget_data
    assert isinstance(data, TemplatedLMData) and len(data.alternates) == len(params.templates)
    answers = {tuple(alt.labels[0][alt.labels[0] != -100].tolist()) for alt in data.alternates}
    seen = set()
    for _ in range(20):
        batch = data.collate(range(len(forget)))
        for row in range(len(forget)):
            labels = batch["alt_labels"][row]
            answer = tuple(labels[labels != -100].tolist())
            assert answer in answers  # every row's alternate is one of the templates
            seen.add(answer)
    assert len(seen) > 1  # and the draw varies


# -- SFR-on -------------------------------------------------------------------------------------------------


def test_sfron_is_the_reference_fast_slow_loop(mlp, small):
    forget, retain = small
    steps, k, lr, alpha0, forget_clip, ada_lambda, decay = 6, 2, 0.05, 5.0, 0.5, 0.5, 5e-4
    model = copy.deepcopy(mlp)
    params = list(model.parameters())
    xf, yf = forget.inputs["inputs"], forget.labels
    xr, yr = retain.inputs["inputs"], retain.labels

    def fisher(x, y):
        model.eval()
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        return [g**2 for g in grads]  # one batch: the mean over batches is that batch

    mask = [((a + 1e-15) / (b + 1e-15) >= 1.0).float() for a, b in zip(fisher(xf, yf), fisher(xr, yr), strict=True)]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for t in range(steps):
        if t % k == 0:
            alpha = alpha0 * (1 + math.cos(math.pi * t / steps)) / 2
            optimizer.zero_grad()
            losses = F.cross_entropy(model(xf), yf, reduction="none")
            coef = 1 / (losses.detach() ** ada_lambda + 1e-15)
            (-alpha * ((coef / coef.sum()) * losses * len(yf)).mean()).backward()
            for p, m in zip(params, mask, strict=True):
                p.grad *= m
            torch.nn.utils.clip_grad_norm_(params, forget_clip)  # the forget step only
            optimizer.step()
        optimizer.zero_grad()
        F.cross_entropy(model(xr), yr).backward()  # the retain step: unmasked, unclipped
        optimizer.step()
        scheduler.step()

    engine = copy.deepcopy(mlp)
    settings = {
        "lr": lr,
        "steps": steps,
        "k": k,
        "alpha0": alpha0,
        "forget_clip": forget_clip,
        "batch_size": 64,
        "weight_decay": decay,
        "max_grad_norm": 1e-3,
    }  # a retain step clipped at 1e-3 would not match
    out = unlearn(engine, "classifier", "sfron", settings, forget, retain)
    assert out.report["loop"]["mode"] == "fixed"
    for ours, theirs in zip(engine.parameters(), model.parameters(), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


# -- SalUn --------------------------------------------------------------------------------------------------


def test_salun_is_the_reference_forget_pass_then_retain_pass(mlp, small):
    forget, retain = small
    lr, q, decay, seed, epochs = 0.02, 0.3, 5e-4, 3, 2
    model = copy.deepcopy(mlp)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    xf, yf = forget.inputs["inputs"], forget.labels
    xr, yr = retain.inputs["inputs"], retain.labels
    # mask: |Σ_batches ∇(−CE)| on the forget rows, eval mode, global top-q
    model.eval()
    saliency = [g.abs() for g in torch.autograd.grad(-F.cross_entropy(model(xf), yf), params)]
    flat = torch.cat([s.reshape(-1) for s in saliency])
    threshold = flat.sort(descending=True).values[round(q * flat.numel()) - 1]
    mask = [(s >= threshold).float() for s in saliency]
    theta0 = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay)
    generator = torch.Generator().manual_seed(seed)  # the engine's draws, in its order

    def masked_step(loss):
        optimizer.zero_grad()
        loss.backward()
        for p, m in zip(params, mask, strict=True):
            p.grad *= m
        optimizer.step()
        with torch.no_grad():
            for p, m, p0 in zip(params, mask, theta0, strict=True):
                p.copy_(torch.where(m.bool(), p, p0))

    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yf), generator=generator)
        wrong = (yf[order] + torch.randint(1, 10, (len(yf),), generator=generator)) % 10
        masked_step(F.cross_entropy(model(xf[order]), wrong))  # the forget pass (one full batch)
        order = torch.randperm(len(yr), generator=generator)
        masked_step(F.cross_entropy(model(xr[order]), yr[order]))  # then the retain pass

    engine = copy.deepcopy(mlp)
    settings = {
        "lr": lr,
        "steps": 2 * epochs,
        "q": q,
        "optimizer": "sgd",
        "weight_decay": decay,
        "seed": seed,
        "batch_size": 64,
    }
    out = unlearn(engine, "classifier", "salun", settings, forget, retain)
    assert out.report["loop"]["mode"] == "fixed" and out.report["params"]["max_grad_norm"] == 1e4  # no clipping
    for name, ours, theirs in zip(names, engine.parameters(), model.parameters(), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6), (name, (ours - theirs).abs().max())


# -- GU -----------------------------------------------------------------------------------------------------


class Moody(nn.Module):
    """Its output depends on train/eval mode, so a basis taken in eval mode would differ from the reference's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * (2.0 if self.training else 0.5)


def test_gu_projects_the_masked_forget_gradient_off_the_retain_batch_in_train_mode(small):
    forget, retain = small
    torch.manual_seed(0)
    model = Moody()
    params = list(model.parameters())
    mask = {n: (torch.rand_like(p) > 0.5).float() for n, p in model.named_parameters()}
    masks = list(mask.values())
    settings = GradAscentParams(lr=1e-3, steps=1, gu=True, gu_retain_samples=4, batch_size=64)
    ctx = context(model, forget, retain)
    objective = get("unlearn", "grad_ascent").function(ctx, settings)
    objective.forget_mask = mask
    trainer = _Trainer(ctx, objective, settings, lr=1e-3, horizon=1)
    batch = retain.collate(range(4))
    model.train()
    ours = _flat(trainer._forget_grads(0, mask, lambda: batch)).double()

    def flat_grads(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    flat_mask = torch.cat([m.reshape(-1) for m in masks]).double()
    xf, yf = forget.inputs["inputs"], forget.labels
    xr, yr = batch["inputs"], batch["labels"]

    def plain(train: bool) -> torch.Tensor:
        model.train(train)
        rows = torch.stack(
            [flat_grads(F.cross_entropy(model(xr[i : i + 1]), yr[i : i + 1])) * flat_mask for i in range(4)]
        )
        model.train()
        g_f = flat_grads(-F.cross_entropy(model(xf), yf)) * flat_mask
        basis, _ = torch.linalg.qr(rows.T)
        return g_f - basis @ (basis.T @ g_f)

    expected = plain(train=True)
    assert torch.allclose(ours, expected, atol=1e-6 * float(expected.norm()))
    assert not torch.allclose(ours, plain(train=False), atol=1e-3 * float(expected.norm()))  # the mode matters
    assert float(ours[flat_mask == 0].abs().max()) == 0.0  # inside the mask
    for i in range(4):  # orthogonal to every retain row's full (unmasked) gradient
        g = flat_grads(F.cross_entropy(model(xr[i : i + 1]), yr[i : i + 1]))
        assert abs(float(ours @ g)) < 1e-6 * float(ours.norm() * g.norm())


# -- exact matches ------------------------------------------------------------------------------------------


class Oracle(nn.Module):
    """Predicts every next token right (teacher-forced), except the token `hard`, which it never predicts."""

    def __init__(self, vocab: int, hard: int) -> None:
        super().__init__()
        self.vocab, self.hard = vocab, hard
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=False, **_):
        target = torch.roll(input_ids, -1, dims=1)
        target = torch.where(target == self.hard, (target + 1) % self.vocab, target)
        logits = F.one_hot(target, self.vocab).float() * 10.0 + self.weight
        return type("Out", (), {"logits": logits})()


def test_sequence_and_token_exact_match_count_what_their_names_say(tokenizer):
    rows = LMData.from_rows(
        [
            {"prompt": "person1 city ?", "completion": "value1 value2"},
            {"prompt": "person2 city ?", "completion": "value1 value3"},
        ],
        tokenizer,
    )
    oracle = Oracle(len(tokenizer), tokenizer.convert_tokens_to_ids("value2"))
    report = lm_report(oracle, rows, None, None, torch.device("cpu"))
    # answers are 3 tokens (two words + EOS): row 1 misses one of them, row 2 none
    assert report["forget_sequence_exact_match"] == pytest.approx(50.0)
    assert report["forget_token_exact_match"] == pytest.approx(100.0 * (2 / 3 + 1) / 2)


def test_random_label_shares_salun_s_passes_without_a_mask(mlp, small):
    forget, retain = small
    data = ClassifierData(forget.inputs, forget.labels)
    ctx = context(mlp, data, retain)
    objective = get("unlearn", "random_label").function(ctx, get("unlearn", "random_label").params_model())
    assert objective.passes and objective.forget_mask is None and objective.retain_loss is not None
