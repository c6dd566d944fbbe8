"""`random_label`: relabel forget samples at random (Golatkar et al.; SalUn repo `unlearn/RL.py`).

L = γ·CE(f(x_f), ỹ) + α·CE(f(x_r), y_r), ỹ a uniformly random label other than the true one.
"""

from __future__ import annotations

from app.schemas.unlearn import RandomLabelParams
from workers.engines.registry import register
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import classifier_logits, per_sample_ce, random_other_labels


def random_label_loss(ctx: UnlearnContext, weight: float):
    """γ·CE toward random wrong labels, as a loop loss (shared with SalUn)."""

    def loss(model, batch, step):
        logits = classifier_logits(model, batch)
        wrong = random_other_labels(batch["labels"], logits.shape[-1], ctx.generator)
        return weight * per_sample_ce(logits, wrong).mean()

    return loss


@register("unlearn", "random_label", RandomLabelParams)
def random_label(ctx: UnlearnContext, params: RandomLabelParams) -> Objective:
    ctx.need_forget()
    ctx.need_retain()
    return Objective(
        forget_loss=random_label_loss(ctx, params.gamma),
        retain_loss=lambda model, batch, step: params.alpha * ctx.task_loss(model, batch),
    )
