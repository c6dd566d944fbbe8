"""`l1_sparse`: fine-tune on retain with a decaying L1 penalty (Jia et al., "Model sparsity can simplify
machine unlearning", NeurIPS 2023; SalUn repo `unlearn/FT.py::FT_l1`): CE(D_r) + α·(1 − t/T)·‖θ‖₁."""

from __future__ import annotations

from app.schemas.unlearn import L1SparseParams
from workers.engines.registry import register
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import l1_norm


@register("unlearn", "l1_sparse", L1SparseParams)
def l1_sparse(ctx: UnlearnContext, params: L1SparseParams) -> Objective:
    ctx.need_retain()
    weights = [p for _, p in ctx.trainable]

    def retain_loss(model, batch, step):
        coefficient = params.l1 * max(0.0, 1.0 - step / ctx.horizon)
        return ctx.task_loss(model, batch) + coefficient * l1_norm(weights)

    return Objective(retain_loss=retain_loss)
