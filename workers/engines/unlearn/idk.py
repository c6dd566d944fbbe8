"""`idk`: IdkDPO (Maini et al. 2024, TOFU; open-unlearning `DPO` with an "I don't know" winner).

DPO against a frozen θ0 with the template answer as the winner and the true answer as the loser, β = 0.1,
plus α·NLL(D_r).
"""

from __future__ import annotations

import torch

from app.schemas.unlearn import IdkParams
from workers.engines.registry import register
from workers.engines.unlearn.data import LMData, PairedLMData, split_pair
from workers.engines.unlearn.errors import UnlearnError
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import compute_batch_nll, dpo_loss


@register("unlearn", "idk", IdkParams)
def idk(ctx: UnlearnContext, params: IdkParams) -> Objective:
    forget = ctx.need_forget()
    ctx.need_retain()
    if not isinstance(forget, LMData):
        raise UnlearnError("idk needs language-model rows")
    paired = PairedLMData(forget, forget.with_completion(params.template))
    reference = ctx.reference()

    def forget_loss(model, batch, step):
        lose, win = split_pair(batch)
        win_nll, _ = compute_batch_nll(model, win)
        lose_nll, _ = compute_batch_nll(model, lose)
        with torch.no_grad():
            win_ref, _ = compute_batch_nll(reference, win)
            lose_ref, _ = compute_batch_nll(reference, lose)
        return params.gamma * dpo_loss(win_nll, win_ref, lose_nll, lose_ref, params.beta)

    return Objective(
        forget_loss=forget_loss,
        retain_loss=lambda model, batch, step: params.alpha * ctx.task_loss(model, batch),
        forget_data=paired,
    )
