"""`sfron`: SFR-on, unified unlearning with remain geometry (Huang et al., NeurIPS 2024, arXiv 2409.19732).

`K1nght/Unified-Unlearning-w-Remain-Geometry:Classification/unlearn/sfron.py`:
- mask m = [(F_f + 1e-15)/(F_r + 1e-15) ≥ γ], F the diagonal Fisher (mean squared per-batch gradients);
- every k iterations a slow, masked AdaGA step on a forget batch: −α_t·mean(w_i ℓ_i), w_i ∝ 1/(ℓ_i^λ + 1e-15)
  normalised to sum to the batch size, α_t = α0·½(1 + cos(πt/T)), its gradient clipped at `forget_clip`;
- every iteration a fast, unmasked, unclipped CE step on a retain batch (the implicit remain-Hessian
  approximation): the reference clips only the forget step.
T is `steps`, or the step budget of a goal-driven run.

The pieces (`remain_fisher`, `saliency_mask`, `adaga_ascent`, `fast_slow`) are shared with `ug_clu`, whose
slow step also learns rows.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from app.schemas.unlearn import SfronParams
from workers.engines.registry import register
from workers.engines.unlearn.data import Data, batches
from workers.engines.unlearn.loop import Loss, Objective, UnlearnContext
from workers.engines.unlearn.losses import adaptive_ga_weights, classifier_logits, per_sample_ce
from workers.engines.unlearn.saliency import squared_gradient_mean

FISHER_EPS = 1e-15
MAX_FISHER_BATCHES = 64  # the retain Fisher is estimated on at most this many batches


def remain_fisher(ctx: UnlearnContext, retain: Data, batch_size: int) -> dict[str, Tensor]:
    """F_r: the diagonal Fisher of the task loss over (at most MAX_FISHER_BATCHES batches of) the retain rows."""
    return squared_gradient_mean(
        ctx.model, ctx.trainable, batches(retain, batch_size)[:MAX_FISHER_BATCHES], ctx.task_loss, ctx.device
    )


def saliency_mask(
    ctx: UnlearnContext, data: Data, fisher_r: dict[str, Tensor], batch_size: int, gamma: float, cap: int | None = None
) -> dict[str, Tensor]:
    """m = [(F_d + ε)/(F_r + ε) ≥ γ], F_d the diagonal Fisher over `data` (its first `cap` batches)."""
    fisher = squared_gradient_mean(ctx.model, ctx.trainable, batches(data, batch_size)[:cap], ctx.task_loss, ctx.device)
    return {name: ((fisher[name] + FISHER_EPS) / (fisher_r[name] + FISHER_EPS) >= gamma).float() for name in fisher}


def mask_fraction(mask: dict[str, Tensor]) -> float:
    return sum(float(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())


def adaga_ascent(ctx: UnlearnContext, params: SfronParams) -> Loss:
    """−α_t·mean(w_i ℓ_i) on a forget batch: AdaGA weights, α_t cosine-decayed from α0 over the horizon."""

    def loss(model: nn.Module, batch: dict[str, Tensor], step: int) -> Tensor:
        alpha_t = params.alpha0 * 0.5 * (1.0 + math.cos(math.pi * min(step, ctx.horizon) / ctx.horizon))
        losses = per_sample_ce(classifier_logits(model, batch), batch["labels"])
        return -alpha_t * (adaptive_ga_weights(losses, params.ada_lambda) * losses).mean()

    return loss


def fast_slow(ctx: UnlearnContext, params: SfronParams, slow: Loss, mask: dict[str, Tensor]) -> Objective:
    """The fast–slow loop: `slow` masked and clipped every k iterations, an unmasked retain CE step every one."""
    return Objective(
        forget_loss=slow,
        retain_loss=lambda model, batch, step: ctx.task_loss(model, batch),
        forget_every=params.k,
        forget_mask=mask,
        forget_clip=params.forget_clip,
        clip_retain=False,
        report={"mask_fraction": mask_fraction(mask)},
    )


@register("unlearn", "sfron", SfronParams)
def sfron(ctx: UnlearnContext, params: SfronParams) -> Objective:
    forget = ctx.need_forget()
    fisher_r = remain_fisher(ctx, ctx.need_retain(), params.batch_size)
    mask = saliency_mask(ctx, forget, fisher_r, params.batch_size, params.gamma)
    return fast_slow(ctx, params, adaga_ascent(ctx, params), mask)

