"""`muso`: exact unlearning by relabelling in over-parameterised regimes (Yang et al., "MUSO: Achieving Exact
Machine Unlearning in Over-Parameterized Regimes", arXiv 2410.08557, as derived in `research/seed-methods.md`
§4; no code was found, and the paper's Algorithm 1 was not readable).

The linear result (`relabel`): for f = Φθ trained by gradient descent from θ₀ (which converges to the
interpolant nearest θ₀), relabelling the forget rows with

    Ỹ_f = Φ_fθ₀ + K_fr K_rr⁻¹ (Y_r − Φ_rθ₀),   K = ΦΦᵀ,

— the prediction on D_f of the model retrained on D_r alone — and fine-tuning the trained θ* on D_r together
with (X_f, Ỹ_f) converges to the retrained parameters θ_r exactly. Fine-tuning on the relabelled D_f alone does
not (the tests check both).

Deep networks alternate the two steps over the shared loop: every `relabel_every` steps (a) Φ = the current
network's penultimate features, Ỹ_f = K_fr(K_rr + λI)⁻¹Y_r on m = `relabel_rows` class-balanced retain rows
(Y_r one-hot, λ = ridge·tr(K_rr)/m, features with a constant 1 appended for the head's bias); (b) the steps
between relabellings fine-tune on a retain batch and a relabelled forget batch, weighted by their shares of
D_r ∪ D_f (`losses.union_weights`).

Decided here, where the spec marks the paper [unclear]:
- the head's starting point θ₀ is taken as 0 (the deployed model's initialisation is unknown; starting from
  the trained head itself would give back the original predictions, since θ* interpolates D_r);
- the penultimate features are the input of the model's last `nn.Linear` with one output per class (LoRA
  factors and peft's `original_module` copies excluded);
- relabelled rows are trained with CE to the relabels clipped at 0 and normalised (uniform when all are ≤ 0),
  retain rows with CE (`target_loss="soft_ce"`), or both with MSE of the logits to one-hot / relabel targets
  (`"mse"`, the squared-loss regime of the theorem);
- defaults T·E ↦ `relabel_every` = 50 steps, m = 2,000, ridge 1e-3, SGD (not from the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.schemas.unlearn import MusoParams
from workers.engines.registry import register
from workers.engines.unlearn.data import ClassifierData, batches
from workers.engines.unlearn.errors import UnsupportedFamily
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import classifier_logits, per_sample_ce, union_weights


def relabel(
    phi_f: Tensor,
    phi_r: Tensor,
    y_r: Tensor,
    ridge: float = 0.0,
    offset_f: Tensor | None = None,
    offset_r: Tensor | None = None,
) -> Tensor:
    """Ỹ_f = offset_f + K_fr (K_rr + λI)⁻¹ (Y_r − offset_r), K = ΦΦᵀ, λ = ridge·tr(K_rr)/m; in float64."""
    phi_f, phi_r, y_r = phi_f.double(), phi_r.double(), y_r.double()
    k_rr, k_fr = phi_r @ phi_r.T, phi_f @ phi_r.T
    lam = ridge * float(torch.trace(k_rr)) / max(phi_r.shape[0], 1)
    residual = y_r - (offset_r.double() if offset_r is not None else 0.0)
    solved = torch.linalg.solve(k_rr + lam * torch.eye(k_rr.shape[0], dtype=k_rr.dtype, device=k_rr.device), residual)
    return k_fr @ solved + (offset_f.double() if offset_f is not None else 0.0)


def soft_targets(relabels: Tensor) -> Tensor:
    """Relabels clipped at 0 and normalised per row; uniform where a row has no positive entry."""
    positive = relabels.clamp_min(0.0)
    total = positive.sum(dim=1, keepdim=True)
    uniform = torch.full_like(positive, 1.0 / positive.shape[1])
    return torch.where(total > 0, positive / total.clamp_min(1e-30), uniform)


def head_of(model: nn.Module, num_classes: int) -> nn.Linear:
    """The last `nn.Linear` with `num_classes` outputs (not a LoRA factor nor peft's frozen original)."""
    found = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.out_features == num_classes
        and "lora_" not in name
        and "original_module" not in name
    ]
    if not found:
        raise UnsupportedFamily(f"muso needs a final nn.Linear with {num_classes} outputs to read features from")
    return found[-1]


def features(model: nn.Module, head: nn.Linear, data: ClassifierData, device: torch.device) -> Tensor:
    """[φ(x), 1]: the head's inputs over `data`, with a bias column, in eval mode without gradients."""
    captured: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().flatten(1)))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches(data, 256):
                classifier_logits(model, {k: v.to(device) for k, v in batch.items()})
    finally:
        handle.remove()
        model.train(training)
    phi = torch.cat(captured).float().cpu()
    return torch.cat([phi, torch.ones(phi.shape[0], 1, device=phi.device)], dim=1)


def balanced_rows(labels: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Up to `count` row indices, as many per class as the classes allow, seeded."""
    classes = labels.unique()
    per_class = -(-count // len(classes))
    picked = [
        rows[torch.randperm(len(rows), generator=generator, device=generator.device)[:per_class]]
        for rows in (torch.nonzero(labels == c).flatten() for c in classes)
    ]
    chosen = torch.cat(picked)
    return chosen[torch.randperm(len(chosen), generator=generator, device=generator.device)[:count]].sort().values


@register("unlearn", "muso", MusoParams)
def muso(ctx: UnlearnContext, params: MusoParams) -> Objective:
    forget, retain = ctx.need_forget(), ctx.need_retain()
    if not isinstance(forget, ClassifierData) or not isinstance(retain, ClassifierData):
        raise UnsupportedFamily("muso needs classifier rows")
    with torch.no_grad():
        sample = {k: v.to(ctx.device) for k, v in forget.collate([0]).items()}
        num_classes = int(classifier_logits(ctx.model, sample).shape[-1])
    head = head_of(ctx.model, num_classes)
    fit_rows = retain.subset(balanced_rows(retain.labels, params.relabel_rows, ctx.generator))
    y_fit = F.one_hot(fit_rows.labels, num_classes).float()
    state: dict[str, object] = {"round": 0}
    report: dict[str, object] = {"relabel_rows": len(fit_rows), "relabels": 0}

    def solve() -> Tensor:
        phi_f = features(ctx.model, head, forget, ctx.device)
        phi_r = features(ctx.model, head, fit_rows, ctx.device)
        report["relabels"] = int(report["relabels"]) + 1  # type: ignore[call-overload]
        return relabel(phi_f, phi_r, y_fit, params.ridge).float()

    state["targets"] = solve()
    first: Tensor = state["targets"]  # type: ignore[assignment]
    report["relabelled_as_true_class"] = float((first.argmax(dim=1) == forget.labels).float().mean())
    row_numbers = torch.arange(len(forget), device=forget.labels.device)
    indexed = ClassifierData(dict(forget.inputs), row_numbers)  # labels: row numbers
    w_forget, w_retain = union_weights(len(forget), len(retain))

    def forget_loss(model: nn.Module, batch: dict[str, Tensor], step: int) -> Tensor:
        if step // params.relabel_every != state["round"]:
            state["round"], state["targets"] = step // params.relabel_every, solve()
        relabels: Tensor = state["targets"]  # type: ignore[assignment]
        rows = batch["labels"]
        logits = classifier_logits(model, {k: v for k, v in batch.items() if k != "labels"}).float()
        wanted = relabels.to(logits.device)[rows]
        if params.target_loss == "mse":
            return w_forget * F.mse_loss(logits, wanted)
        return w_forget * -(soft_targets(wanted) * logits.log_softmax(dim=-1)).sum(dim=1).mean()

    def retain_loss(model: nn.Module, batch: dict[str, Tensor], step: int) -> Tensor:
        logits = classifier_logits(model, batch).float()
        if params.target_loss == "mse":
            return w_retain * F.mse_loss(logits, F.one_hot(batch["labels"], num_classes).float())
        return w_retain * per_sample_ce(logits, batch["labels"]).mean()

    return Objective(forget_loss=forget_loss, retain_loss=retain_loss, forget_data=indexed, report=report)
