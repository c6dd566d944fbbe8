"""`ug_clu`: continual learn-and-unlearn (Huang et al., "A Unified Gradient-based Framework for Task-agnostic
Continual Learning-Unlearning", arXiv 2505.15178, 2025; as specified in `research/seed-methods.md` §5). No code
was found; the paper's abstract and a summary of its objective were read: minimise KL(p(θ*) ‖ p(θ_{k+1})),
θ* the oracle trained on D_R ∪ D_L without D_U, which splits into learning D_L, unlearning D_U and preserving
D_R, modulated by weight saliency, with SFR-on's fast–slow loop for the remain-Hessian compensation.

One job learns rows D_L while it forgets rows D_U and keeps D_R, through `sfron`'s pieces:
1. Balanced saliency mask: m = m_U ∨ m_L, m_X = [(F_X + ε)/(F_R + ε) ≥ γ], F the diagonal Fisher of the task
   loss over D_X and over (at most 64 batches of) D_R — SFR-on's mask test applied to each task.
2. Slow step, every k iterations: g = clip(m⊙∇[−α_t·mean_i(w_i ℓ_i(D_U batch))]) + clip(m⊙∇[p_L·mean ℓ(D_L
   batch)]), each clipped to `forget_clip` on its own, w_i SFR-on's AdaGA weights ∝ ℓ_i^(−λ) (the adaptive
   weighting of the forget rows), α_t = α0·½(1 + cos(πt/T)).
3. Fast step, every iteration: an unmasked, unclipped CE step on a batch of D_R ∪ D_L (the replay of the final
   data, the oracle's training set).

Decided here, where the spec marks the paper [unclear]:
- D_L sits in the slow step with D_U, under the mask: the abstract's "remaining Hessian compensation for CLU
  iterations" compensates the whole learn-and-unlearn update, and the fast remain steps are that compensation.
- "Balanced" mask: each task tests its own Fisher against the remain Fisher at the same γ and the mask is the
  union, so neither task's larger gradients (ascent on D_U; a new class's loss ≈ log K) decide the mask alone,
  as a mask from the Fisher of the combined slow loss would. With no learn rows it is SFR-on's mask. For the
  same reason each task's masked gradient is clipped on its own: clipped together (tried first), the growing
  ascent (α0 = 25, losses in the hundreds once D_U is forgotten) took the whole norm and the learn rows of
  the tests' digits job stayed at 0 % after 200 steps (SGD at 0.01, α0 = 25, fast steps on D_R alone).
- The fast steps replay D_R ∪ D_L, not D_R alone (the spec's replay source is "stored rows minus D_U, plus
  earlier learned rows"; whether the rows being learned join it is not said): on D_R alone every fast step
  pushes a new class's logit down (no D_R row carries it) against the slow step that teaches it. Measured on
  the tests' digits job (learn the 9s, forget the 3s, SGD, 300 steps at 0.05, α0 = 1): learn rows 91.7 %
  with D_R alone, 98.6 % with D_R ∪ D_L, forget rows 0 % and retain rows ≥ 97.2 % in both.
- p_L (`learn_weight`) is a constant, default 1 (the learn CE weighs as the retain CE of a fast step), not the
  data share |D_L|/|D| of the KL decomposition: the fast steps already replay D_L at its share, and the slow
  step's learn term is the explicit learning direction beside an ascent weighted by α_t. Learn rows get no
  per-row adaptive weights (the paper's adaptive coefficients are for unlearning tasks "with varying
  difficulty").
- Only `ug_clu` takes learn rows (it declares the `learn` input; other methods refuse them at the door): the
  learn term and its mask are this method's, and a descent term added to a forgetting method (natmu's hybrids,
  ssd's one-shot edit) would be a new, untested method. It needs learn rows (without them it is `sfron`), forget
  rows and retain rows (the fast step). Classifiers only, like `sfron` here.
- Delete wins (the spec): the job drops learn rows whose content (row hash) equals a forget row's before
  training, and its audit record lists them (`workers/jobs/unlearn.py`).
- The goal (`goal.py`): the forget goal, and the learn rows learned — their accuracy at or above the goal's
  `learn_accuracy`, or by default the retain accuracy the run started from minus `retain_accuracy_drop`.
  Forgetting is class-wise when neither retain nor learn rows carry a forget row's label.
- The retrained reference (`reference: "retrain"`) trains on D_R ∪ D_L: the paper's oracle θ*.
- After the job the learned rows belong to the next job's retain rows (the paper's replay D_R grows): the caller
  passes them; the service keeps no replay set of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.schemas.unlearn import UgCluParams
from workers.engines.registry import register
from workers.engines.unlearn.data import ClassifierData, joined
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.sfron import (
    MAX_FISHER_BATCHES,
    adaga_ascent,
    fast_slow,
    mask_fraction,
    remain_fisher,
    saliency_mask,
)


def balanced_mask(mask_u: dict[str, Tensor], mask_l: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: torch.maximum(mask_u[name], mask_l[name]) for name in mask_u}


@register("unlearn", "ug_clu", UgCluParams)
def ug_clu(ctx: UnlearnContext, params: UgCluParams) -> Objective:
    forget, retain, learn = ctx.need_forget(), ctx.need_retain(), ctx.need_learn()
    # balanced saliency mask
    fisher_r = remain_fisher(ctx, retain, params.batch_size)
    mask_u = saliency_mask(ctx, forget, fisher_r, params.batch_size, params.gamma)
    mask_l = saliency_mask(ctx, learn, fisher_r, params.batch_size, params.gamma, cap=MAX_FISHER_BATCHES)
    mask = balanced_mask(mask_u, mask_l)

    objective = fast_slow(ctx, params, adaga_ascent(ctx, params), mask)  # adaptively weighted ascent on D_U
    # descent on D_L, in the same slow steps and under the same mask
    objective.learn_loss = lambda model, batch, step: params.learn_weight * ctx.task_loss(model, batch)
    # the fast steps replay the final data: retain and learn rows
    if isinstance(retain, ClassifierData) and isinstance(learn, ClassifierData):
        objective.retain_data = joined(retain, learn)
    objective.report.update(
        forget_mask_fraction=mask_fraction(mask_u), learn_mask_fraction=mask_fraction(mask_l), learn_rows=len(learn)
    )
    return objective
