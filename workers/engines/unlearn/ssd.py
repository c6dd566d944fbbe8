"""`ssd`: Selective Synaptic Dampening (Foster et al., AAAI 2024, arXiv 2308.07707;
`if-loops/selective-synaptic-dampening:src/ssd.py`). No training, no optimiser.

I_D, I_f: mean squared per-batch CE gradients over D (retain, or retain ∪ forget) and over D_f. Where
I_f > α·I_D, θ ← θ·min(λ·I_D/I_f, 1): weights are only ever scaled down. With the forget rows inside D the
ratio I_f/I_D cannot exceed about |D|/|D_f|, so α at or above that selects nothing: the report says so.
"""

from __future__ import annotations

import torch

from app.schemas.unlearn import SsdParams
from workers.engines.registry import register
from workers.engines.unlearn.data import batches
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.saliency import squared_gradient_mean


def dampen(
    parameter: torch.Tensor, importance_d: torch.Tensor, importance_f: torch.Tensor, alpha: float, lambda_: float
) -> int:
    """Scale the selected coordinates of `parameter` in place by min(λ·I_D/I_f, 1); returns how many."""
    selected = importance_f > alpha * importance_d
    factor = (lambda_ * importance_d / importance_f.clamp_min(1e-30)).clamp(max=1.0)
    parameter.mul_(torch.where(selected, factor, torch.ones_like(factor)).to(parameter.dtype))
    return int(selected.sum())


@register("unlearn", "ssd", SsdParams)
def ssd(ctx: UnlearnContext, params: SsdParams) -> Objective:
    forget = ctx.need_forget()
    retain = ctx.need_retain()

    def edit() -> dict:
        reference_batches = batches(retain, params.batch_size)
        if params.importance_on == "retain_and_forget":
            reference_batches += batches(forget, params.batch_size)
        importance_d = squared_gradient_mean(ctx.model, ctx.trainable, reference_batches, ctx.task_loss, ctx.device)
        importance_f = squared_gradient_mean(
            ctx.model, ctx.trainable, batches(forget, params.batch_size), ctx.task_loss, ctx.device
        )
        selected = total = 0
        with torch.no_grad():
            for name, parameter in ctx.trainable:
                selected += dampen(parameter, importance_d[name], importance_f[name], params.alpha, params.lambda_)
                total += parameter.numel()
        report: dict = {"ssd_selected_fraction": selected / max(total, 1)}
        bound = (len(retain) + len(forget)) / len(forget)
        if params.importance_on == "retain_and_forget" and params.alpha >= bound:
            report["warning"] = (
                f"alpha={params.alpha} ≥ |D|/|D_f| ≈ {bound:.1f}: with the forget rows in D "
                "almost no weight can be selected; lower alpha or use importance_on=retain"
            )
        return report

    return Objective(edit=edit)
