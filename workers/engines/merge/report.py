"""Data-free quality report of a merge, computed from the factors without forming any m×n matrix.

Per module and task t (ΔW_t = B_tA_t, weights and scalings folded in):
- energy kept ‖UᵀΔW_tV‖²/‖ΔW_t‖² in [0, 1], U, V orthonormal bases of the output's column / row spaces;
- the task's sign-conflict rate on the representation the method merges in (from the method);
- pairwise cosine similarity ⟨ΔW_s, ΔW_t⟩/(‖ΔW_s‖‖ΔW_t‖) in [−1, 1];
and per module the relative Frobenius error ‖ΔW_out − λΣ_tΔW_t‖/‖λΣ_tΔW_t‖ against the full-space task
arithmetic merge. Everything uses trace identities on small Gram matrices, e.g.
‖B_sA_s‖² = Σ (B_sᵀB_s)∘(A_sA_sᵀ) and ⟨B_oA_o, B_sA_s⟩ = Σ (B_oᵀB_s)∘(A_oA_sᵀ).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from workers.engines.merge.core_space import StackedFactors, spans
from workers.engines.merge.types import RANK_TOL, MergedModule, ModuleGrams


def factor_grams(stack: StackedFactors, lora_B: Tensor, lora_A: Tensor) -> ModuleGrams:
    """The report's Gram matrices from the stacked inputs and the output factors (thin GEMMs in float64, used
    for methods whose output is not lifted from core coordinates: full space and KnOTS)."""
    b_s, a_s, b_o, a_o = stack.lora_B.double(), stack.lora_A.double(), lora_B.double(), lora_A.double()
    return ModuleGrams(
        gram_B=b_s.mT @ b_s,
        gram_A=a_s @ a_s.mT,
        cross_B=b_o.mT @ b_s,
        cross_A=a_o @ a_s.mT,
        out_B=b_o.mT @ b_o,
        out_A=a_o @ a_o.mT,
    )


def _orth_coeffs(gram: Tensor, cross: Tensor) -> Tensor:
    """Coordinates of the stacked inputs in an orthonormal basis of the output's span: with the output's
    Gram Z S² Zᵀ, the basis is out·Z S⁻¹, so the coordinates are S⁻¹ Zᵀ cross."""
    lam, z = torch.linalg.eigh(gram)
    keep = lam > lam[-1:].clamp(min=torch.finfo(torch.float64).tiny) * RANK_TOL**2
    inv = torch.where(keep, 1.0 / lam.clamp(min=torch.finfo(torch.float64).tiny).sqrt(), 0.0)
    return (inv.unsqueeze(-1) * z.mT) @ cross


def module_report(
    grams: ModuleGrams,
    ranks: Sequence[int],
    tasks: Sequence[int],
    num_tasks: int,
    lambda_: float,
    merged: MergedModule,
) -> dict[str, Any]:
    """Report of one module: per-task energy kept, sign conflict and norm, cosine matrix, rel. error, rank."""
    g_b, g_a = grams.gram_B, grams.gram_A
    sl = spans(ranks)
    # task inner products ⟨ΔW_s, ΔW_t⟩ = Σ (B_sᵀB_t)∘(A_sA_tᵀ): block sums of the elementwise product
    blocks = torch.zeros(len(ranks), g_b.shape[0], dtype=torch.float64, device=g_b.device)
    for i, s in enumerate(sl):
        blocks[i, s] = 1.0
    inner = (blocks @ (g_b * g_a) @ blocks.mT).cpu()
    norms_sq = inner.diagonal().clamp(min=0)
    # relative error against λ·Σ_t ΔW_t
    ref_sq = lambda_**2 * float(inner.sum())
    out_sq = float((grams.out_B * grams.out_A).sum())
    dot = lambda_ * float((grams.cross_B * grams.cross_A).sum())
    err_sq = max(out_sq - 2.0 * dot + ref_sq, 0.0)
    rel_error = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if out_sq == 0 else None)
    # energy kept per task: ‖(UᵀB_t)(A_tV)‖² / ‖ΔW_t‖²
    coef_B = _orth_coeffs(grams.out_B, grams.cross_B)
    coef_A = _orth_coeffs(grams.out_A, grams.cross_A)
    per_task: list[dict[str, Any]] = [{"task": t, "present": False} for t in range(num_tasks)]
    cosine: list[list[float | None]] = [[None] * num_tasks for _ in range(num_tasks)]
    for i, t in enumerate(tasks):
        kept = float((coef_B[:, sl[i]] @ coef_A[:, sl[i]].mT).square().sum())
        norm_sq = float(norms_sq[i])
        per_task[t] = {
            "task": t,
            "present": True,
            "norm": math.sqrt(norm_sq),
            "energy_kept": min(kept / norm_sq, 1.0) if norm_sq > 0 else None,
            "sign_conflict": merged.sign_conflict[t] if merged.sign_conflict is not None else None,
        }
        for j, other in enumerate(tasks):
            denom = math.sqrt(float(norms_sq[i]) * float(norms_sq[j]))
            cosine[t][other] = float(inner[i, j]) / denom if denom > 0 else None
    return {
        "rank": merged.rank,
        "input_ranks": {str(t): r for t, r in zip(tasks, ranks, strict=True)},
        "rel_error": rel_error,
        "reference_norm": math.sqrt(ref_sq),
        "error_norm": math.sqrt(err_sq),
        "tasks": per_task,
        "cosine": cosine,
        **merged.report,
    }


def summarize(modules: dict[str, dict[str, Any]], num_tasks: int) -> dict[str, Any]:
    """Totals: per-task energy kept over all modules (energy-weighted), its mean and worst task, the mean
    and overall relative error, and the output rank per module."""
    kept = [0.0] * num_tasks
    total = [0.0] * num_tasks
    worst_module: dict[str, Any] | None = None
    for name, rep in modules.items():
        for task in rep["tasks"]:
            if not task["present"] or task["energy_kept"] is None:
                continue
            t, norm_sq = task["task"], task["norm"] ** 2
            kept[t] += task["energy_kept"] * norm_sq
            total[t] += norm_sq
            if worst_module is None or task["energy_kept"] < worst_module["energy_kept"]:
                worst_module = {"module": name, "task": t, "energy_kept": task["energy_kept"]}
    per_task = [kept[t] / total[t] if total[t] > 0 else None for t in range(num_tasks)]
    known = [e for e in per_task if e is not None]
    errors = [rep["rel_error"] for rep in modules.values() if rep["rel_error"] is not None]
    ref = sum(rep["reference_norm"] ** 2 for rep in modules.values())
    err = sum(rep["error_norm"] ** 2 for rep in modules.values())
    return {
        "num_modules": len(modules),
        "num_tasks": num_tasks,
        "energy_kept_per_task": per_task,
        "energy_kept_mean": sum(known) / len(known) if known else None,
        "energy_kept_worst_task": min(known) if known else None,
        "energy_kept_worst_module": worst_module,
        "rel_error_mean": sum(errors) / len(errors) if errors else None,
        "rel_error_overall": math.sqrt(err / ref) if ref > 0 else None,
        "output_rank": {name: rep["rank"] for name, rep in modules.items()},
    }
