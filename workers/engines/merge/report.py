"""Data-free quality report of a merge, computed from the factors without forming any m×n matrix.

Per module and task t (ΔW_t = B_tA_t, weights and scalings folded in), ΔW the output:
- `energy_kept_fraction` ‖UᵀΔW_tV‖²/‖ΔW_t‖² in [0, 1], U, V orthonormal bases of the output's column / row
  spaces (the fraction of the task's update inside the output's subspaces);
- `sign_conflict` in [0, 1]: the share of the task's energy on its own singular directions along which the
  output points the other way — with ΔW_t = Σ_i σ_i u_i v_iᵀ, Σ_i σ_i²·[u_iᵀΔW v_i < 0] / Σ_i σ_i². It depends
  only on the linear maps ΔW_t and ΔW, not on any basis (core basis, factorisation, or entries), so it is
  the same for every rule and space; an entrywise count (the TIES paper's) changes with the basis the
  entries are taken in (in core space it moved from 0.11–0.31 to 0.31–0.35 between bases);
- pairwise cosine similarity ⟨ΔW_s, ΔW_t⟩/(‖ΔW_s‖‖ΔW_t‖) in [−1, 1];
and per module:
- `deviation_from_sum` ‖ΔW − λΣ_tΔW_t‖/‖λΣ_tΔW_t‖ (how far the rule moves from plain task arithmetic);
- `compression_error` ‖ΔW − R‖/‖R‖, R the same rule's uncompressed merge (stated by the method: the merged
  core before truncation for merge-then-compress and KnOTS, the core-space merge of the full cores for CtM);
- `effective_rank` of ΔW: exp of the entropy of its normalised singular values (Roy & Vetterli, 2007);
- `output_norm` ‖ΔW‖, and in the totals `output_norm_fraction_total` = sqrt(Σ‖ΔW‖²/Σ‖λΣ_tΔW_t‖²): how much
  of the plain sum's size the output keeps (near 0: the merge gave back the base model, e.g. a `rain` whose
  projection or coefficients annihilated the update).
Totals weight modules by their norms. Everything uses trace identities on small Gram matrices, e.g.
‖B_sA_s‖² = Σ (B_sᵀB_s)∘(A_sA_sᵀ) and ⟨B_oA_o, B_sA_s⟩ = Σ (B_oᵀB_s)∘(A_oA_sᵀ).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from workers.engines import linalg_pool
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
    lam, z = linalg_pool.eigh(gram)
    keep = lam > lam[..., -1:].clamp(min=torch.finfo(torch.float64).tiny) * RANK_TOL**2
    inv = torch.where(keep, 1.0 / lam.clamp(min=torch.finfo(torch.float64).tiny).sqrt(), 0.0)
    return (inv.unsqueeze(-1) * z.mT) @ cross


def _frames(grams: Tensor) -> tuple[Tensor, Tensor]:
    """For factors X with Grams G = XᵀX = ZΛZᵀ (…, r, r): (R = Λ^½Zᵀ, W = ZΛ^-½), so X = Q·R with Q = X·W
    orthonormal. Null directions are zero rows of R and zero columns of W (not dropped, so a batch keeps one
    shape), which leaves every product below unchanged."""
    lam, z = linalg_pool.eigh(grams)
    keep = lam > lam[..., -1:].clamp(min=torch.finfo(torch.float64).tiny) * RANK_TOL**2
    root = torch.where(keep, lam.clamp(min=0).sqrt(), 0.0)
    inv = torch.where(keep, 1.0 / root.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return root.unsqueeze(-1) * z.mT, z * inv.unsqueeze(-2)


def _sign_conflicts(grams: ModuleGrams, slices: Sequence[slice]) -> list[list[float | None]]:
    """`_sign_conflict` of every module (G) and task, batched over both when the tasks' ranks agree (the usual
    case), else per module and task."""
    sizes = {s.stop - s.start for s in slices}
    if len(sizes) != 1:
        return [[_sign_conflict(one, s) for s in slices] for one in _unstacked(grams)]
    idx = torch.stack([torch.arange(s.start, s.stop, device=grams.gram_B.device) for s in slices])  # (T, r)
    rows, cols = idx.unsqueeze(-1), idx.unsqueeze(-2)
    r_B, w_B = _frames(grams.gram_B[:, rows, cols])  # (G, T, r, r): each task's diagonal block
    r_A, w_A = _frames(grams.gram_A[:, rows, cols])
    x, s, yh = linalg_pool.svd(r_B @ r_A.mT)
    cross_B = grams.cross_B[:, :, idx].transpose(1, 2)  # (G, T, k, r): B_oᵀB_t
    cross_A = grams.cross_A[:, :, idx].transpose(1, 2)  # (G, T, k, r): A_oA_tᵀ
    along = (w_B.mT @ cross_B.mT) @ (cross_A @ w_A)
    d = ((x.mT @ along) * yh).sum(-1)  # (G, T, r): u_iᵀ ΔW v_i
    energy = s.square()
    total = energy.sum(-1).tolist()
    against = (energy * (d < 0)).sum(-1).tolist()
    return [
        [a / t if t > 0 else None for t, a in zip(tt, aa, strict=True)]
        for tt, aa in zip(total, against, strict=True)
    ]


def _sign_conflict(grams: ModuleGrams, span: slice) -> float | None:
    """Σ_i σ_i²·[u_iᵀΔW v_i < 0] / Σ_i σ_i² over task t's singular triplets (u_i, σ_i, v_i), from Grams."""
    r_B, w_B = _frames(grams.gram_B[span, span])  # B_t = Q_B R_B (null directions as zero rows)
    r_A, w_A = _frames(grams.gram_A[span, span])  # A_tᵀ = Q_A R_A
    x, s, yh = linalg_pool.svd(r_B @ r_A.mT)  # ΔW_t = (Q_B X) Σ (Q_A Y)ᵀ
    # Q_BᵀΔW Q_A = W_BᵀB_tᵀ(B_oA_o)A_tᵀW_A, with B_tᵀB_o = cross_Bᵀ and A_oA_tᵀ = cross_A (task columns)
    along = (w_B.mT @ grams.cross_B[:, span].mT) @ (grams.cross_A[:, span] @ w_A)
    d = ((x.mT @ along) * yh).sum(-1)  # u_iᵀ ΔW v_i
    energy = s.square()
    total = float(energy.sum())
    return float(energy[d < 0].sum()) / total if total > 0 else None


def _effective_ranks(grams: ModuleGrams) -> list[float]:
    """exp(−Σ p_i log p_i), p_i = σ_i/Σσ over each output's singular values (from its two k×k Grams)."""
    r_B, _ = _frames(grams.out_B)
    sigma = linalg_pool.eigvalsh(r_B @ grams.out_A @ r_B.mT).clamp(min=0).sqrt()  # (G, k)
    kept = sigma > sigma.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny) * RANK_TOL
    p = torch.where(kept, sigma, 0.0) / torch.where(kept, sigma, 0.0).sum(-1, keepdim=True).clamp(
        min=torch.finfo(torch.float64).tiny
    )
    entropy = -torch.where(kept, p * p.clamp(min=torch.finfo(torch.float64).tiny).log(), 0.0).sum(-1)
    present = kept.any(-1).tolist()
    return [math.exp(h) if any_kept else 0.0 for h, any_kept in zip(entropy.tolist(), present, strict=True)]


_FIELDS = tuple(f.name for f in fields(ModuleGrams))


def _stacked(grams: Sequence[ModuleGrams]) -> ModuleGrams:
    """G modules' Grams of the same shapes as one ModuleGrams of tensors with a leading module axis."""
    return ModuleGrams(**{f: torch.stack([getattr(g, f) for g in grams]) for f in _FIELDS})


def _unstacked(batch: ModuleGrams) -> list[ModuleGrams]:
    return [ModuleGrams(**{f: getattr(batch, f)[i] for f in _FIELDS}) for i in range(batch.gram_B.shape[0])]


def shape_key(grams: ModuleGrams, ranks: Sequence[int], tasks: Sequence[int]) -> tuple[object, ...]:
    """Modules whose reports `module_reports` can compute together share this key."""
    return (tuple(ranks), tuple(tasks), *(tuple(getattr(grams, f).shape) for f in _FIELDS), grams.gram_B.device)


def module_reports(
    grams: Sequence[ModuleGrams],
    ranks: Sequence[int],
    tasks: Sequence[int],
    num_tasks: int,
    lambda_: float,
    merged: Sequence[MergedModule],
) -> list[dict[str, Any]]:
    """Reports of G modules with the same tasks, ranks and Gram shapes (`shape_key`), computed together:
    per task energy kept, sign conflict and norm; cosine matrix; deviation from the sum, compression error,
    effective rank and rank."""
    batch = _stacked(grams)
    g_b, g_a = batch.gram_B, batch.gram_A
    sl = spans(ranks)
    # task inner products ⟨ΔW_s, ΔW_t⟩ = Σ (B_sᵀB_t)∘(A_sA_tᵀ): block sums of the elementwise product
    blocks = torch.zeros(len(ranks), g_b.shape[-1], dtype=torch.float64, device=g_b.device)
    for i, s in enumerate(sl):
        blocks[i, s] = 1.0
    inner_all = blocks @ (g_b * g_a) @ blocks.mT  # (G, T, T)
    # deviation from λ·Σ_t ΔW_t
    ref_all = (lambda_**2 * inner_all.sum(dim=(-2, -1))).tolist()
    out_all = (batch.out_B * batch.out_A).sum(dim=(-2, -1)).tolist()
    dot_all = (lambda_ * (batch.cross_B * batch.cross_A).sum(dim=(-2, -1))).tolist()
    # energy kept per task: ‖(UᵀB_t)(A_tV)‖² / ‖ΔW_t‖²
    coef_B = _orth_coeffs(batch.out_B, batch.cross_B)  # (G, k, K)
    coef_A = _orth_coeffs(batch.out_A, batch.cross_A)
    if len({s.stop - s.start for s in sl}) == 1:  # equal ranks: every task's block in one batched product
        g, k_B, k_A, r = coef_B.shape[0], coef_B.shape[1], coef_A.shape[1], sl[0].stop - sl[0].start
        per_B = coef_B.reshape(g, k_B, len(sl), r).transpose(1, 2)
        per_A = coef_A.reshape(g, k_A, len(sl), r).transpose(1, 2)
        kept_all = (per_B @ per_A.mT).square().sum(dim=(-2, -1)).tolist()
    else:
        kept_all = torch.stack(
            [(coef_B[..., s] @ coef_A[..., s].mT).square().sum(dim=(-2, -1)) for s in sl], dim=-1
        ).tolist()
    conflicts_all = _sign_conflicts(batch, sl)
    effective_all = _effective_ranks(batch)
    reports = []
    for j, result in enumerate(merged):
        inner, out_sq, ref_sq = inner_all[j].tolist(), out_all[j], ref_all[j]
        norms_sq = [max(inner[i][i], 0.0) for i in range(len(tasks))]
        err_sq = max(out_sq - 2.0 * dot_all[j] + ref_sq, 0.0)
        deviation = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if out_sq == 0 else None)
        # compression error against the same rule's uncompressed merge (stated by the method)
        compression = None
        unc_sq, comp_sq = result.compression if result.compression is not None else (None, None)
        if unc_sq is not None and comp_sq is not None:
            compression = math.sqrt(comp_sq / unc_sq) if unc_sq > 0 else (0.0 if comp_sq == 0 else None)
        per_task: list[dict[str, Any]] = [{"task": t, "present": False} for t in range(num_tasks)]
        cosine: list[list[float | None]] = [[None] * num_tasks for _ in range(num_tasks)]
        for i, t in enumerate(tasks):
            norm_sq = norms_sq[i]
            per_task[t] = {
                "task": t,
                "present": True,
                "norm": math.sqrt(norm_sq),
                "energy_kept_fraction": min(kept_all[j][i] / norm_sq, 1.0) if norm_sq > 0 else None,
                "sign_conflict": conflicts_all[j][i] if out_sq > 0 else None,
            }
            for o, other in enumerate(tasks):
                denom = math.sqrt(norms_sq[i] * norms_sq[o])
                cosine[t][other] = inner[i][o] / denom if denom > 0 else None
        reports.append({
            "rank": result.rank,
            "input_ranks": {str(t): r for t, r in zip(tasks, ranks, strict=True)},
            "deviation_from_sum": deviation,
            "sum_norm": math.sqrt(ref_sq),
            "output_norm": math.sqrt(out_sq),
            "deviation_norm": math.sqrt(err_sq),
            "compression_error": compression,
            "uncompressed_norm": math.sqrt(unc_sq) if unc_sq is not None else None,
            "compression_error_norm": math.sqrt(comp_sq) if comp_sq is not None else None,
            "effective_rank": effective_all[j] if out_sq > 0 else 0.0,
            "tasks": per_task,
            "cosine": cosine,
            **result.report,
        })
    return reports


def _total(modules: dict[str, dict[str, Any]], error: str, reference: str) -> float | None:
    """sqrt(Σ error²/Σ reference²) over the modules that state both."""
    rows = [r for r in modules.values() if r[error] is not None and r[reference] is not None]
    ref = sum(r[reference] ** 2 for r in rows)
    return math.sqrt(sum(r[error] ** 2 for r in rows) / ref) if ref > 0 else None


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarize(modules: dict[str, dict[str, Any]], num_tasks: int) -> dict[str, Any]:
    """Totals: per task the energy kept fraction and sign conflict over all modules (weighted by the task's
    energy per module), their mean and worst task; deviation from the sum and compression error, mean over
    modules and total (norm-weighted); mean effective rank; the output rank per module."""
    kept, conflict, total, weighed = [0.0] * num_tasks, [0.0] * num_tasks, [0.0] * num_tasks, [0.0] * num_tasks
    worst_module: dict[str, Any] | None = None
    for name, rep in modules.items():
        for task in rep["tasks"]:
            if not task["present"]:
                continue
            t, norm_sq = task["task"], task["norm"] ** 2
            if task["sign_conflict"] is not None:
                conflict[t] += task["sign_conflict"] * norm_sq
                weighed[t] += norm_sq
            if task["energy_kept_fraction"] is None:
                continue
            kept[t] += task["energy_kept_fraction"] * norm_sq
            total[t] += norm_sq
            if worst_module is None or task["energy_kept_fraction"] < worst_module["energy_kept_fraction"]:
                worst_module = {"module": name, "task": t, "energy_kept_fraction": task["energy_kept_fraction"]}
    per_task = [kept[t] / total[t] if total[t] > 0 else None for t in range(num_tasks)]
    known = [e for e in per_task if e is not None]
    return {
        "num_modules": len(modules),
        "num_tasks": num_tasks,
        "energy_kept_fraction_per_task": per_task,
        "energy_kept_fraction_mean": sum(known) / len(known) if known else None,
        "energy_kept_fraction_worst_task": min(known) if known else None,
        "energy_kept_fraction_worst_module": worst_module,
        "sign_conflict_per_task": [conflict[t] / weighed[t] if weighed[t] > 0 else None for t in range(num_tasks)],
        "deviation_from_sum_mean": _mean([rep["deviation_from_sum"] for rep in modules.values()]),
        "deviation_from_sum_total": _total(modules, "deviation_norm", "sum_norm"),
        "output_norm_fraction_total": _total(modules, "output_norm", "sum_norm"),
        "compression_error_mean": _mean([rep["compression_error"] for rep in modules.values()]),
        "compression_error_total": _total(modules, "compression_error_norm", "uncompressed_norm"),
        "effective_rank_mean": _mean([rep["effective_rank"] for rep in modules.values()]),
        "output_rank": {name: rep["rank"] for name, rep in modules.items()},
    }
