"""`random_label`: relabel forget samples at random (Golatkar et al.; `Unlearn-Saliency:Classification/unlearn/RL.py`).

Each epoch of the reference (its CIFAR-10/SVHN branch) is a pass over D_f with random labels, then a pass over
D_r with the true ones, one optimiser step per batch: γ·CE(f(x_f), ỹ) steps, then α·CE(f(x_r), y_r) steps. ỹ is
a uniformly random label other than the true one, as in the SFR-on repository's `Classification/unlearn/salun.py`
(RL.py draws over all classes, the true one included). SalUn (`salun.py`) is this objective with a saliency mask.
"""

from __future__ import annotations

from torch import Tensor

from app.schemas.unlearn import RandomLabelParams
from workers.engines.registry import register
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import classifier_logits, per_sample_ce, random_other_labels


def random_label_loss(ctx: UnlearnContext, weight: float):
    """γ·CE toward random wrong labels, as a loop loss."""

    def loss(model, batch, step):
        logits = classifier_logits(model, batch)
        wrong = random_other_labels(batch["labels"], logits.shape[-1], ctx.generator)
        return weight * per_sample_ce(logits, wrong).mean()

    return loss


def random_label_objective(ctx: UnlearnContext, params: RandomLabelParams, mask: dict[str, Tensor] | None = None):
    """A forget pass with random labels, then a retain pass; with `mask`, both passes' gradients are masked and
    the weights outside it are reset to θ0 after every step (SalUn)."""
    ctx.need_forget()
    ctx.need_retain()
    return Objective(
        forget_loss=random_label_loss(ctx, params.gamma),
        retain_loss=lambda model, batch, step: params.alpha * ctx.task_loss(model, batch),
        passes=True,
        forget_mask=mask,
        retain_mask=mask,
        restore_outside_mask=mask is not None,
    )


@register("unlearn", "random_label", RandomLabelParams)
def random_label(ctx: UnlearnContext, params: RandomLabelParams) -> Objective:
    return random_label_objective(ctx, params)
