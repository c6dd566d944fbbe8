"""`grad_diff`: L = −γ·NLL(D_f) + α·NLL(D_r) (open-unlearning `GradDiff`)."""

from __future__ import annotations

from app.schemas.unlearn import GradDiffParams
from workers.engines.registry import register
from workers.engines.unlearn.loop import Objective, UnlearnContext


@register("unlearn", "grad_diff", GradDiffParams)
def grad_diff(ctx: UnlearnContext, params: GradDiffParams) -> Objective:
    ctx.need_forget()
    ctx.need_retain()
    return Objective(
        forget_loss=lambda model, batch, step: -params.gamma * ctx.task_loss(model, batch),
        retain_loss=lambda model, batch, step: params.alpha * ctx.task_loss(model, batch),
    )
