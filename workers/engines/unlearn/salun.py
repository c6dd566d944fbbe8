"""`salun`: saliency unlearning (Fan et al., ICLR 2024, arXiv 2310.12508; `OPTML-Group/Unlearn-Saliency`).

1. Mask (`Classification/generate_mask.py`): |Σ_batches ∇(−CE)| over D_f in eval mode; m = 1 on the global
   top-q fraction of coordinates (the SFR-on repository's `salun.py` ranks the same way).
2. Random labelling restricted to the mask (`Classification/unlearn/RL.py`): each epoch a pass over D_f with
   random labels, then a pass over D_r, both passes' gradients multiplied by m, and the weights outside the
   mask reset to θ0 after every step — `random_label`'s objective with the mask. Like the reference, no
   gradient clipping by default (`max_grad_norm` 1e4). The reference's optimiser is SGD (momentum 0.9, weight
   decay 5e-4); here AdamW unless `optimizer: "sgd"` — the goal-driven defaults were chosen with AdamW.
"""

from __future__ import annotations

from app.schemas.unlearn import SalunParams
from workers.engines.registry import register
from workers.engines.unlearn.data import batches
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.random_label import random_label_objective
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
    objective = random_label_objective(ctx, params, mask)
    objective.report["mask_fraction"] = kept
    return objective
