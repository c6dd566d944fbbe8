"""`salun`: saliency unlearning (Fan et al., ICLR 2024, arXiv 2310.12508; `OPTML-Group/Unlearn-Saliency`).

1. Mask: |Σ_batches ∇(−CE)| over D_f (eval mode); m = 1 on the global top-q fraction of coordinates.
2. Random labelling (forget, γ) plus CE on D_r (α), gradients multiplied by m; weights outside the mask are
   reset to θ0 after every step.
"""

from __future__ import annotations

from app.schemas.unlearn import SalunParams
from workers.engines.registry import register
from workers.engines.unlearn.data import batches
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.random_label import random_label_loss
from workers.engines.unlearn.saliency import gradient_sum, top_fraction_mask


@register("unlearn", "salun", SalunParams)
def salun(ctx: UnlearnContext, params: SalunParams) -> Objective:
    forget = ctx.need_forget()
    ctx.need_retain()
    # saliency of the forget loss
    saliency = gradient_sum(
        ctx.model,
        ctx.trainable,
        batches(forget, params.batch_size),
        lambda model, batch: -ctx.task_loss(model, batch),
        ctx.device,
    )
    mask = top_fraction_mask({name: g.abs() for name, g in saliency.items()}, params.q)
    kept = sum(float(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    return Objective(
        forget_loss=random_label_loss(ctx, params.gamma),
        retain_loss=lambda model, batch, step: params.alpha * ctx.task_loss(model, batch),
        forget_mask=mask,
        restore_outside_mask=True,
        report={"mask_fraction": kept},
    )
