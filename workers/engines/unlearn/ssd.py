"""`ssd`: Selective Synaptic Dampening (Foster et al., AAAI 2024, arXiv 2308.07707;
`if-loops/selective-synaptic-dampening:src/ssd.py`). No training, no optimiser.

I_D, I_f: mean squared per-batch CE gradients over D (retain, or retain ∪ forget) and over D_f. Where
I_f > α·I_D, θ ← θ·min(λ·I_D/I_f, 1): weights are only ever scaled down. With the forget rows inside D the
ratio I_f/I_D cannot exceed about |D|/|D_f|, so α at or above that selects nothing: the report says so.

α is the paper's one knob, and its value depends on the data: the paper's α = 10 suits 100 classes, but
with 10 classes and the forget rows in D (|D|/|D_f| ≈ 10) it selects nothing. So `alpha` left null makes the
edit goal-driven, like the training methods' range test: the importances are computed once, then α runs
down `ALPHA_LADDER` (skipping values that cannot select anything) — each α dampens the input weights afresh
and the job's goal and guards are checked — and the first (largest, least destructive) α whose state meets
the goal keeping the guards wins (confirmed on the full splits). When none does, the state of the α that came
nearest the goal keeping the guards is returned, or the input weights when none kept them; the job then
reports `goal_met: false`. Without a measurable goal (no eval rows where it needs them), null α is the
paper's 10. An explicit α is one edit, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from app.schemas.unlearn import SsdParams
from workers.engines.registry import register
from workers.engines.unlearn.data import batches
from workers.engines.unlearn.goal import Check
from workers.engines.unlearn.loop import Objective, UnlearnContext, restore, snapshot
from workers.engines.unlearn.saliency import squared_gradient_mean

PAPER_ALPHA = 10.0
ALPHA_LADDER = (10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.2)


def dampen(
    parameter: torch.Tensor, importance_d: torch.Tensor, importance_f: torch.Tensor, alpha: float, lambda_: float
) -> int:
    """Scale the selected coordinates of `parameter` in place by min(λ·I_D/I_f, 1); returns how many."""
    selected = importance_f > alpha * importance_d
    factor = (lambda_ * importance_d / importance_f.clamp_min(1e-30)).clamp(max=1.0)
    parameter.mul_(torch.where(selected, factor, torch.ones_like(factor)).to(parameter.dtype))
    return int(selected.sum())


@register("unlearn", "ssd", SsdParams)
def ssd(ctx: UnlearnContext, params: SsdParams) -> Objective:
    forget = ctx.need_forget()
    retain = ctx.need_retain()

    def edit(judge: Callable[[bool], Check] | None) -> dict[str, Any]:
        reference_batches = batches(retain, params.batch_size)
        if params.importance_on == "retain_and_forget":
            reference_batches += batches(forget, params.batch_size)
        importance_d = squared_gradient_mean(ctx.model, ctx.trainable, reference_batches, ctx.task_loss, ctx.device)
        importance_f = squared_gradient_mean(
            ctx.model, ctx.trainable, batches(forget, params.batch_size), ctx.task_loss, ctx.device
        )
        total = max(1, sum(parameter.numel() for _, parameter in ctx.trainable))
        # with the forget rows in D, I_f/I_D ≤ about |D|/|D_f|: an α at or above that selects nothing
        bound = (len(retain) + len(forget)) / len(forget) if params.importance_on == "retain_and_forget" else None

        def dampen_all(alpha: float) -> float:
            selected = 0
            with torch.no_grad():
                for name, parameter in ctx.trainable:
                    selected += dampen(parameter, importance_d[name], importance_f[name], alpha, params.lambda_)
            return selected / total

        if params.alpha is not None or judge is None:
            alpha = params.alpha if params.alpha is not None else PAPER_ALPHA
            report: dict[str, Any] = {"ssd_alpha": alpha, "ssd_selected_fraction": dampen_all(alpha)}
            if bound is not None and alpha >= bound:
                report["warning"] = (
                    f"alpha={alpha} ≥ |D|/|D_f| ≈ {bound:.1f}: with the forget rows in D "
                    "almost no weight can be selected; lower alpha or use importance_on=retain"
                )
            return report
        return _search_alpha(ctx, judge, dampen_all, bound)

    return Objective(edit=edit)


def _search_alpha(
    ctx: UnlearnContext, judge: Callable[[bool], Check], dampen_all: Callable[[float], float], bound: float | None
) -> dict[str, Any]:
    """Goal-driven α (see the module docstring): the largest α of the ladder whose dampening meets the goal
    keeping the guards; else the guard-keeping α nearest the goal; else the input weights."""
    original = snapshot(ctx.model, ctx.trainable)
    ladder = [alpha for alpha in ALPHA_LADDER if bound is None or alpha < bound]
    search: list[dict[str, Any]] = []
    nearest: tuple[float, float] | None = None  # (shortfall, alpha) of the best guard-keeping state
    for alpha in ladder:
        restore(ctx.model, ctx.trainable, original)
        fraction = dampen_all(alpha)
        check = judge(False)
        search.append(
            {"alpha": alpha, "selected_fraction": fraction, "shortfall": check.shortfall, "guards_ok": check.guards_ok}
        )
        if check.goal_met and check.guards_ok:
            confirmed = judge(True)
            if confirmed.goal_met and confirmed.guards_ok:
                return {"ssd_alpha": alpha, "ssd_selected_fraction": fraction, "ssd_alpha_search": search}
        if check.guards_ok and (nearest is None or check.shortfall < nearest[0]):
            nearest = (check.shortfall, alpha)
    restore(ctx.model, ctx.trainable, original)
    if nearest is None:
        return {"ssd_alpha": None, "ssd_selected_fraction": 0.0, "ssd_alpha_search": search}
    return {"ssd_alpha": nearest[1], "ssd_selected_fraction": dampen_all(nearest[1]), "ssd_alpha_search": search}
