"""`knots` — KnOTS (Stoica, Ramesh, Ecsedi, Choshen, Hoffman, ICLR 2025; arXiv 2410.19735).

Read from `gstoica27/KnOTS` (`task_merger.py`, `SVDMerger.apply_svd`, `masking_ops.py`). Per module, the
updates stacked side by side X = [ΔW_1 … ΔW_T] (m×Tn) have the thin SVD X = UΣVᵀ; splitting Vᵀ into T
column blocks gives ΔW_t = U·Σ·V_tᵀ. The task representations Σ·V_tᵀ (k×n, k ≤ Tr) of all modules are
concatenated into one vector per task, so the rule's top-k threshold is per task across the whole adapter,
not per layer. Merged: ΔW = λ·U·merged(ΣV_tᵀ), rank ≤ Tr, then truncated exactly to the output rank.

The SVD of X is computed from the factors: X = U_ref·[M_1 … M_T]·diag(V_refᵀ, …), so it is the SVD of
the K×TK matrix of cores lifted by the core bases; singular values ≤ 1e-6·σ_max are dropped (KnOTS: 1e-5).

Memory: the task representations of a whole adapter are T·Σk·n numbers (about 5 GB for eight
Llama-7B-shaped rank-16 adapters), so they are never held together. A magnitude or breadcrumbs rule first
finds each task's thresholds over all modules exactly, streaming the representations twice
(`streamed_magnitudes`), then merges module by module with them, in column pieces of at most 16 MiB; the
alignment is recomputed per pass (cheap next to holding the representations). DARE draws its masks per
piece, seeded by the job seed, the module name and the piece.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from app.schemas.merge import KnotsParams
from workers.engines import linalg_pool
from workers.engines.merge.core_space import batches, compression, core_bases, cores, stack_factors, truncate
from workers.engines.merge.core_space import isotropic as isotropic_core
from workers.engines.merge.rules import RULES, RuleOptions, apply_rule
from workers.engines.merge.sparsify import streamed_magnitudes
from workers.engines.merge.types import RANK_TOL, MergedModule, MergeJob
from workers.engines.registry import register


@dataclass
class _Aligned:
    """One module's SVD alignment: U (m×k), and the task representations ΣV_tᵀ = coeffs_t·A_s (k×n) kept
    as small coefficients (T_present, k, K) over the stacked A_s (K×n), so they are formed piece by piece."""

    u: Tensor
    coeffs: Tensor
    lora_A: Tensor
    tasks: tuple[int, ...]

    def pieces(self, num_tasks: int) -> Iterator[tuple[slice, Tensor]]:
        """(columns, representations of those columns as rows (T, k·w)): zeros for tasks without the module,
        so every task has the same entries; each block stays under _PIECE_BYTES."""
        t_present, k, _ = self.coeffs.shape
        n = self.lora_A.shape[1]
        width = max(1, _PIECE_BYTES // (4 * num_tasks * k))
        for start in range(0, n, width):
            cols = slice(start, min(start + width, n))
            reps = self.coeffs @ self.lora_A[:, cols]  # (T_present, k, w)
            if t_present == num_tasks:
                yield cols, reps.reshape(num_tasks, -1)
                continue
            values = reps.new_zeros(num_tasks, reps.shape[1] * reps.shape[2])
            values[list(self.tasks)] = reps.flatten(1)
            yield cols, values


# Blocks of representations are capped so that every temporary stays under glibc's mmap threshold
# (32 MiB): larger ones are mapped afresh and page-faulted in each time, which costs more than the arithmetic.
_PIECE_BYTES = 16 * 2**20


def _align(name: str, job: MergeJob) -> _Aligned:
    """SVD of [ΔW_1 … ΔW_T] for one module, from its factors."""
    stack = stack_factors(name, job.factors(name))
    basis = core_bases([stack], singular=False)
    m_t = cores(basis, stack.ranks)[0]  # (T, K, K)
    t, d_B, d_A = m_t.shape
    # SVD of [M_1 … M_T] (d_B × T·d_A) = SVD of [ΔW_1 … ΔW_T] in core coordinates
    x, s, yh = linalg_pool.svd(m_t.permute(1, 0, 2).reshape(d_B, t * d_A))
    k = max(1, int((s > s[0] * RANK_TOL).sum()))
    u = stack.lora_B @ (basis.lift_B[0] @ x[:, :k]).to(stack.lora_B.dtype)
    # per-task blocks Σ·V_tᵀ = Σ·Y_tᵀ·V_refᵀ = (Σ·Y_tᵀ·lift_A)·A_s (k × n)
    y_t = (s[:k, None] * yh[:k]).reshape(k, t, d_A).permute(1, 0, 2)  # (T, k, d_A)
    return _Aligned(u=u, coeffs=(y_t @ basis.lift_A[0]).to(stack.lora_A.dtype), lora_A=stack.lora_A, tasks=stack.tasks)


def _global_bounds(job: MergeJob, names: list[str], rule: str, options: RuleOptions) -> Tensor | None:
    """Per task (lo, hi) magnitude bounds of the entries a magnitude or breadcrumbs rule keeps, ranked over
    the whole adapter: (T, 2), or None when the rule does not rank by magnitude or keeps everything."""
    sparsifier = RULES[rule].sparsifier
    if sparsifier not in ("magnitude", "breadcrumbs"):
        return None
    first = options.gamma if sparsifier == "breadcrumbs" else 0.0
    if sparsifier == "magnitude" and options.density >= 1.0:
        return None
    kept: list[int] = []

    def ranks_for(n: int) -> list[int]:  # 0-based ranks of the first and last kept entry (placeholders if none)
        start, count = int(first * n), int(options.density * n)
        kept.append(min(count, n - start))
        return [min(start, n - 1), max(min(start + count, n) - 1, 0)]

    def chunks() -> Iterator[Tensor]:
        for name in names:
            for _, values in _align(name, job).pieces(job.num_tasks):
                yield values
        job.progress(0.25, "ranking each task's entries over the adapter (KnOTS)")

    bounds = streamed_magnitudes(chunks, ranks_for)  # (T, 2) magnitudes at those ranks
    if kept[0] <= 0:  # nothing kept: an empty interval
        return torch.tensor([[float("inf"), 0.0]], device=bounds.device).expand(job.num_tasks, 2)
    upper = bounds[:, 0] if first > 0.0 else torch.full_like(bounds[:, 0], float("inf"))
    return torch.stack([bounds[:, 1], upper], dim=1)


@register("merge", "knots", KnotsParams)
def knots(job: MergeJob, params: KnotsParams) -> dict[str, MergedModule]:
    """KnOTS over the whole adapter: align every module, merge with the rule per task globally, truncate."""
    options = RuleOptions.from_params(params)
    names = [name for batch in batches(job.modules) for name in batch]
    # 1. thresholds per task across all modules (magnitude and breadcrumbs rules)
    bounds = _global_bounds(job, names, params.rule, options)
    # 2. per module: SVD alignment, merge ΣV_tᵀ with the rule, ΔW = λ·U·merged truncated exactly
    out: dict[str, MergedModule] = {}
    for name in names:
        aligned = _align(name, job)
        k, n = aligned.coeffs.shape[1], aligned.lora_A.shape[1]
        merged = aligned.lora_A.new_empty(k, n)
        # the rule is elementwise across tasks given the thresholds, so it runs piece by piece
        # (DARE draws each piece's mask from its own seeded generator)
        for i, (cols, values) in enumerate(aligned.pieces(job.num_tasks)):
            part = values.unsqueeze(0)
            keep = None
            if bounds is not None:
                size = part.abs()
                keep = (size >= bounds[:, :1]) & (size <= bounds[:, 1:])
            outcome = apply_rule(params.rule, part, options, [f"{name}#{i}"], keep=keep)
            merged[:, cols] = outcome.merged.view(k, -1)
        # exact truncation (U is orthonormal), isotropic when asked
        core = merged.unsqueeze(0).double()
        [(left, right)] = truncate(core, [job.targets[name]], isotropic=params.isotropize)
        uncompressed = isotropic_core(core[0]) if params.isotropize else core[0]
        unc_sq, err_sq = compression(left, right, uncompressed)
        lam_sq = params.lambda_**2
        out[name] = MergedModule(
            lora_A=right.to(aligned.u.dtype),
            lora_B=params.lambda_ * (aligned.u @ left.to(aligned.u.dtype)),
            compression=(lam_sq * unc_sq, lam_sq * err_sq),
        )
        job.progress(0.5 + 0.5 * len(out) / max(1, len(names)), "merging (KnOTS)")
    return out
