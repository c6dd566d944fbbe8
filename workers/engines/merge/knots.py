"""`knots` — KnOTS (Stoica, Ramesh, Ecsedi, Choshen, Hoffman, ICLR 2025; arXiv 2410.19735).

Read from `gstoica27/KnOTS` (`task_merger.py`, `SVDMerger.apply_svd`, `masking_ops.py`). Per module, the
updates stacked side by side X = [ΔW_1 … ΔW_T] (m×Tn) have the thin SVD X = UΣVᵀ; splitting Vᵀ into T
column blocks gives ΔW_t = U·Σ·V_tᵀ. The task representations Σ·V_tᵀ (k×n, k ≤ Tr) of all modules are
concatenated into one vector per task, so the rule's top-k threshold is per task across the whole adapter,
not per layer. Merged: ΔW = λ·U·merged(ΣV_tᵀ), rank ≤ Tr, then truncated exactly to the output rank.

The SVD of X is computed from the factors: X = U_ref·[M_1 … M_T]·diag(V_refᵀ, …), so it is the SVD of
the K×TK matrix of cores lifted by the core bases; singular values ≤ 1e-6·σ_max are dropped (KnOTS: 1e-5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.schemas.merge import KnotsParams
from workers.engines.merge.core_space import batches, core_bases, cores, stack_factors
from workers.engines.merge.rules import RuleOptions, apply_rule
from workers.engines.merge.sparsify import sign_conflicts
from workers.engines.merge.types import RANK_TOL, MergedModule, MergeJob
from workers.engines.registry import register


def _align(name: str, job: MergeJob) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """One module's SVD alignment: (U (m×k), task representations ΣV_tᵀ (T_present, k, n), tasks)."""
    stack = stack_factors(name, job.factors(name))
    basis = core_bases([stack], singular=False)
    m_t = cores(basis, stack.ranks)[0]  # (T, K, K)
    t, d_B, d_A = m_t.shape
    # SVD of [M_1 … M_T] (d_B × T·d_A) = SVD of [ΔW_1 … ΔW_T] in core coordinates
    x, s, yh = torch.linalg.svd(m_t.permute(1, 0, 2).reshape(d_B, t * d_A), full_matrices=False)
    k = max(1, int((s > s[0] * RANK_TOL).sum()))
    u = stack.lora_B @ (basis.lift_B[0] @ x[:, :k]).to(stack.lora_B.dtype)
    # per-task blocks Σ·V_tᵀ = Σ·Y_tᵀ·V_refᵀ (k × n)
    y_t = (s[:k, None] * yh[:k]).reshape(k, t, d_A).permute(1, 0, 2)  # (T, k, d_A)
    reps = (y_t @ basis.lift_A[0]).to(stack.lora_A.dtype) @ stack.lora_A
    return u, reps, stack.tasks


@register("merge", "knots", KnotsParams)
def knots(job: MergeJob, params: KnotsParams) -> dict[str, MergedModule]:
    """KnOTS over the whole adapter: align every module, merge with the rule per task globally, truncate."""
    options = RuleOptions.from_params(params)
    aligned: dict[str, tuple[Tensor, tuple[int, ...], slice, tuple[int, int]]] = {}
    blocks: list[Tensor] = []
    offset = 0
    names = [name for batch in batches(job.modules) for name in batch]
    # 1. SVD alignment of the stacked updates, per module
    for name in names:
        u, reps, tasks = _align(name, job)
        full = reps.new_zeros((job.num_tasks, *reps.shape[1:]))
        full[list(tasks)] = reps
        blocks.append(full.flatten(1))
        size = reps.shape[1] * reps.shape[2]
        aligned[name] = (u, tasks, slice(offset, offset + size), (reps.shape[1], reps.shape[2]))
        offset += size
        job.progress(0.5 * len(aligned) / max(1, len(names)), "aligning (KnOTS)")
    # 2. merge ΣV_tᵀ with the rule; the top-k threshold is per task across all modules
    values = torch.cat(blocks, dim=1).unsqueeze(0)
    del blocks
    outcome = apply_rule(params.rule, values, options, ["knots"])
    # 3. ΔW = λ·U·merged, truncated exactly (U is orthonormal) to the output rank
    out: dict[str, MergedModule] = {}
    for name in names:
        u, tasks, span, shape = aligned.pop(name)
        merged = outcome.merged[0, span].reshape(shape).double()
        x, s, yh = torch.linalg.svd(merged, full_matrices=False)
        k = job.targets[name].choose(s)
        root = s[:k].sqrt()
        conflicts = sign_conflicts(outcome.pruned[:, :, span], outcome.sign[:, span])[0]
        out[name] = MergedModule(
            lora_A=(root.unsqueeze(-1) * yh[:k]).to(u.dtype),
            lora_B=params.lambda_ * (u @ (x[:, :k] * root).to(u.dtype)),
            sign_conflict=[float(conflicts[t]) if t in tasks else None for t in range(job.num_tasks)],
        )
        job.progress(0.5 + 0.5 * len(out) / max(1, len(names)), "merging (KnOTS)")
    return out
