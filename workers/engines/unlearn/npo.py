"""`npo`: Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868; open-unlearning `NPO`).

L = γ·(−(2/β)·mean log σ(β·(NLL_θ − NLL_θ0))) on forget answers + α·NLL(D_r); θ0 is a frozen copy.
"""

from __future__ import annotations

import torch

from app.schemas.unlearn import NpoParams
from workers.engines.registry import register
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import compute_batch_nll, npo_loss


@register("unlearn", "npo", NpoParams)
def npo(ctx: UnlearnContext, params: NpoParams) -> Objective:
    ctx.need_forget()
    ctx.need_retain()
    reference = ctx.reference()

    def forget_loss(model, batch, step):
        nll, _ = compute_batch_nll(model, batch)
        with torch.no_grad():
            reference_nll, _ = compute_batch_nll(reference, batch)
        return params.gamma * npo_loss(nll, reference_nll, params.beta)

    return Objective(
        forget_loss=forget_loss,
        retain_loss=lambda model, batch, step: params.alpha * ctx.task_loss(model, batch),
    )
