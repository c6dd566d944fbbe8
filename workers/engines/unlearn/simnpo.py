"""`simnpo`: SimNPO (Fan et al. 2024, arXiv 2410.07163; open-unlearning `SimNPO`), reference-free NPO.

L = γ·(−(2/β)·mean log σ(β·(NLL_θ/|y| − δ))) on forget answers + α·NLL(D_r); defaults β=4.5, γ=0.125.
"""

from __future__ import annotations

from app.schemas.unlearn import SimnpoParams
from workers.engines.registry import register
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import compute_batch_nll, simnpo_loss


@register("unlearn", "simnpo", SimnpoParams)
def simnpo(ctx: UnlearnContext, params: SimnpoParams) -> Objective:
    ctx.need_forget()
    ctx.need_retain()

    def forget_loss(model, batch, step):
        nll, n_tokens = compute_batch_nll(model, batch)
        return params.gamma * simnpo_loss(nll, n_tokens, params.beta, params.delta)

    return Objective(
        forget_loss=forget_loss,
        retain_loss=lambda model, batch, step: params.alpha * ctx.task_loss(model, batch),
    )
