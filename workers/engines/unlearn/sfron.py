"""`sfron`: SFR-on, unified unlearning with remain geometry (Huang et al., NeurIPS 2024, arXiv 2409.19732).

`K1nght/Unified-Unlearning-w-Remain-Geometry:Classification/unlearn/sfron.py`:
- mask m = [(F_f + 1e-15)/(F_r + 1e-15) ≥ γ], F the diagonal Fisher (mean squared per-batch gradients);
- every k iterations a slow, masked AdaGA step on a forget batch: −α_t·mean(w_i ℓ_i), w_i ∝ 1/(ℓ_i^λ + 1e-15)
  normalised to sum to the batch size, α_t = α0·½(1 + cos(πt/T)), its gradient clipped at `forget_clip`;
- every iteration a fast, unmasked, unclipped CE step on a retain batch (the implicit remain-Hessian
  approximation): the reference clips only the forget step.
T is `steps`, or the step budget of a goal-driven run.
"""

from __future__ import annotations

import math

from app.schemas.unlearn import SfronParams
from workers.engines.registry import register
from workers.engines.unlearn.data import batches
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import adaptive_ga_weights, classifier_logits, per_sample_ce
from workers.engines.unlearn.saliency import squared_gradient_mean

FISHER_EPS = 1e-15
MAX_FISHER_BATCHES = 64  # the retain Fisher is estimated on at most this many batches


@register("unlearn", "sfron", SfronParams)
def sfron(ctx: UnlearnContext, params: SfronParams) -> Objective:
    forget = ctx.need_forget()
    retain = ctx.need_retain()
    loss_fn = ctx.task_loss
    fisher_f = squared_gradient_mean(ctx.model, ctx.trainable, batches(forget, params.batch_size), loss_fn, ctx.device)
    fisher_r = squared_gradient_mean(
        ctx.model, ctx.trainable, batches(retain, params.batch_size)[:MAX_FISHER_BATCHES], loss_fn, ctx.device
    )
    mask = {
        name: ((fisher_f[name] + FISHER_EPS) / (fisher_r[name] + FISHER_EPS) >= params.gamma).float()
        for name in fisher_f
    }
    kept = sum(float(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())

    def forget_loss(model, batch, step):
        alpha_t = params.alpha0 * 0.5 * (1.0 + math.cos(math.pi * min(step, ctx.horizon) / ctx.horizon))
        losses = per_sample_ce(classifier_logits(model, batch), batch["labels"])
        return -alpha_t * (adaptive_ga_weights(losses, params.ada_lambda) * losses).mean()

    return Objective(
        forget_loss=forget_loss,
        retain_loss=lambda model, batch, step: ctx.task_loss(model, batch),
        forget_every=params.k,
        forget_mask=mask,
        forget_clip=params.forget_clip,
        clip_retain=False,
        report={"mask_fraction": kept},
    )
