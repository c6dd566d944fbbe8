"""`finetune`: keep training on the retain set only (FT in SalUn `unlearn/FT.py`): catastrophic forgetting."""

from __future__ import annotations

from app.schemas.unlearn import FinetuneParams
from workers.engines.registry import register
from workers.engines.unlearn.loop import Objective, UnlearnContext


@register("unlearn", "finetune", FinetuneParams)
def finetune(ctx: UnlearnContext, params: FinetuneParams) -> Objective:
    ctx.need_retain()
    return Objective(retain_loss=lambda model, batch, step: ctx.task_loss(model, batch))
