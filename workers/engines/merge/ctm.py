"""`ctm` — Compress-then-Merge (He, Ding, Huang, Yang, Li, Huang, ICML 2026; arXiv 2606.03723).

Read from the official code (`ZhengbaoHe/compress-then-merge`, `task_merger.py`, branch
`merge_space='low_rank_core'`). Per module:

1. core bases U_ref, V_ref of the stacked B's and A's; cores M_t = U_refᵀ B_t A_t V_ref (K×K, exact);
2. norm balancing, for the subspace choice only: M̃_t = M_t·(β·c_t + (1−β)·c̄)/c_t, c_t = ‖M_t‖_F;
3. Tucker-2 of stack(M̃_t) with ranks [r, r] by HOOI from an HOSVD start, until the objective
   Σ_t‖PᵀM̃_tQ‖² stops improving (at most `max_iter` sweeps); U = U_ref·P, V = V_ref·Q;
4. coordinates C_t = PᵀM_tQ (r×r) of the un-balanced cores;
5. merge the C_t with the rule, optionally isotropize (singular values → their mean);
6. output B = λ·U·C, A = Vᵀ, or balanced (SVD C = XΣYᵀ): B = λ·U·X·Σ^½, A = Σ^½·Yᵀ·Vᵀ.

The output rank is at most r by construction; nothing is truncated afterwards, and no m×n is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.schemas.merge import CtmParams
from workers.engines.merge.core_space import batches, core_bases, cores, lift, lifted_grams, stack_factors
from workers.engines.merge.rules import RuleOptions, apply_rule
from workers.engines.merge.types import RANK_TOL, MergedModule, MergeJob, RankTarget
from workers.engines.registry import register

HOOI_TOL = 1e-6


def balance(m_t: Tensor, beta: float) -> Tensor:
    """Rescale each task's core to norm β·c_t + (1−β)·c̄ (β in [0, 1]; 1 = unchanged). (G, T, K, K)."""
    norms = m_t.flatten(2).norm(dim=-1)  # (G, T)
    target = beta * norms + (1.0 - beta) * norms.mean(dim=1, keepdim=True)
    scale = torch.where(norms > 0, target / norms.clamp(min=torch.finfo(m_t.dtype).tiny), 0.0)
    return m_t * scale[..., None, None]


def _top_eig(sym: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-r eigenpairs of symmetric PSD matrices (G, K, K): (vectors (G,K,r), values (G,r)), descending."""
    values, vectors = torch.linalg.eigh(sym)
    return vectors[..., -r:].flip(-1), values[..., -r:].flip(-1)


def hooi(m_t: Tensor, r: int, max_iter: int) -> tuple[Tensor, Tensor, list[int], Tensor, Tensor]:
    """Tucker-2 (modes 0, 1; ranks [r, r]) of the core stacks m_t (G, T, K, K) by HOOI from HOSVD.

    Returns P, Q (G, K, r) orthonormal, the sweeps each module needed, and the objective
    Σ_t‖PᵀM_tQ‖² at the HOSVD start and at the end (both (G,)).
    """
    # HOSVD start: top-r eigenvectors of Σ M_tM_tᵀ and Σ M_tᵀM_t
    p, _ = _top_eig((m_t @ m_t.mT).sum(dim=1), r)
    q, _ = _top_eig((m_t.mT @ m_t).sum(dim=1), r)
    start = (p.mT.unsqueeze(1) @ m_t @ q.unsqueeze(1)).square().sum(dim=(1, 2, 3))
    objective = start
    done = torch.zeros_like(start, dtype=torch.bool)
    sweeps = [0] * m_t.shape[0]
    for sweep in range(1, max_iter + 1):
        # P ← top-r eigenvectors of Σ (M_tQ)(M_tQ)ᵀ
        mq = m_t @ q.unsqueeze(1)
        p_new, _ = _top_eig((mq @ mq.mT).sum(dim=1), r)
        # Q ← top-r eigenvectors of Σ (M_tᵀP)(M_tᵀP)ᵀ; the objective is the sum of its top-r eigenvalues
        mp = m_t.mT @ p_new.unsqueeze(1)
        q_new, values = _top_eig((mp @ mp.mT).sum(dim=1), r)
        new = values.sum(dim=-1)
        active = ~done
        p = torch.where(active[:, None, None], p_new, p)
        q = torch.where(active[:, None, None], q_new, q)
        improved = new - objective
        objective = torch.where(active, new, objective)
        for i in torch.nonzero(active).flatten().tolist():
            sweeps[i] = sweep
        done |= improved <= HOOI_TOL * objective.abs().clamp(min=torch.finfo(m_t.dtype).tiny)
        if bool(done.all()):
            break
    return p, q, sweeps, start, objective


def tucker_rank(target: RankTarget, balanced: Tensor, rank_B: int, rank_A: int) -> int:
    """r for one module (balanced cores (T, K, K)): the target rank, or the smallest r keeping `energy`
    of both mode spectra; never above the numerical ranks of the stacks."""
    cap = max(1, min(rank_B, rank_A))
    if target.energy is None:
        return max(1, min(target.rank, cap))
    ranks = []
    for gram in ((balanced @ balanced.mT).sum(0), (balanced.mT @ balanced).sum(0)):
        values = torch.linalg.eigvalsh(gram).flip(-1).clamp(min=0)
        ranks.append(RankTarget(rank=cap, energy=target.energy).choose(values.sqrt()))
    return max(1, min(max(ranks), cap))


def isotropize(core: Tensor) -> Tensor:
    """Replace the non-zero singular values of each merged core (G, r, r) by their mean (Iso-C)."""
    x, s, yh = torch.linalg.svd(core)
    keep = s > s[:, :1] * RANK_TOL
    mean = (s * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1)
    return x @ ((mean * keep).unsqueeze(-1) * yh)


@register("merge", "ctm", CtmParams)
def ctm(job: MergeJob, params: CtmParams) -> dict[str, MergedModule]:
    """Compress-then-Merge every module to its output rank r (≤ r by construction)."""
    options = RuleOptions.from_params(params)
    lam = params.lambda_
    out: dict[str, MergedModule] = {}
    total = max(1, len(job.modules))
    for batch in batches(job.modules):
        stacks = [stack_factors(name, job.modules[name]) for name in batch]
        # 1. core bases and exact cores
        basis = core_bases(stacks)
        m_t = cores(basis, stacks[0].ranks)
        # 2. norm balancing (subspace choice only)
        balanced = balance(m_t, params.beta)
        ranks = [
            tucker_rank(job.targets[name], balanced[i], basis.rank_B[i], basis.rank_A[i])
            for i, name in enumerate(batch)
        ]
        for r in sorted(set(ranks)):
            idx = [i for i, ri in enumerate(ranks) if ri == r]
            # 3. Tucker-2 by HOOI from HOSVD: shared subspaces P, Q
            p, q, sweeps, start, final = hooi(balanced[idx], r, params.max_iter)
            fit_total = balanced[idx].square().sum(dim=(1, 2, 3)).clamp(min=torch.finfo(torch.float64).tiny)
            # 4. coordinates of the original cores
            c_t = p.mT.unsqueeze(1) @ m_t[idx] @ q.unsqueeze(1)  # (g, T, r, r)
            g, t = c_t.shape[:2]
            # 5. merge the coordinates with the rule, optionally isotropize
            outcome = apply_rule(params.rule, c_t.reshape(g, t, r * r), options, [batch[i] for i in idx])
            merged = outcome.merged.reshape(g, r, r)
            if params.isotropize:
                merged = isotropize(merged)
            conflicts = outcome.conflicts()
            # 6. output factors in weight space
            for j, i in enumerate(idx):
                if params.balanced:
                    x, s, yh = torch.linalg.svd(merged[j])
                    k = RankTarget(rank=r).choose(s)
                    root = s[:k].sqrt()
                    left = lam * (p[j] @ (x[:, :k] * root))
                    right = (root.unsqueeze(-1) * yh[:k]) @ q[j].mT
                else:
                    left, right = lam * (p[j] @ merged[j]), q[j].mT
                stack = stacks[i]
                lora_B, lora_A = lift(stack, basis, i, left, right)
                per_task: list[float | None] = [None] * job.num_tasks
                for jj, task in enumerate(stack.tasks):
                    per_task[task] = float(conflicts[j, jj])
                out[stack.name] = MergedModule(
                    lora_A=lora_A,
                    lora_B=lora_B,
                    sign_conflict=per_task,
                    grams=lifted_grams(basis, i, left, right),
                    report={
                        "hooi_sweeps": sweeps[j],
                        "tucker_fit_start": float(start[j] / fit_total[j]),
                        "tucker_fit": float(final[j] / fit_total[j]),
                    },
                )
        job.progress(len(out) / total, "compress-then-merge")
    return out
