"""`grad_ascent`: gradient ascent on the forget set, L = −loss(D_f) (both families).

open-unlearning `GradAscent`; SalUn repo `unlearn/GA.py`. A baseline: it collapses the model if run long.
"""

from __future__ import annotations

from app.schemas.unlearn import GradAscentParams
from workers.engines.registry import register
from workers.engines.unlearn.loop import Objective, UnlearnContext


@register("unlearn", "grad_ascent", GradAscentParams)
def grad_ascent(ctx: UnlearnContext, params: GradAscentParams) -> Objective:
    ctx.need_forget()
    return Objective(forget_loss=lambda model, batch, step: -ctx.task_loss(model, batch))
