"""`ctm` — Compress-then-Merge (He, Ding, Huang, Yang, Li, Huang, ICML 2026; arXiv 2606.03723).

Read from the official code (`ZhengbaoHe/compress-then-merge`, `task_merger.py`, branch
`merge_space='low_rank_core'`). Per module:

1. core bases U_ref, V_ref of the stacked B's and A's; cores M_t = U_refᵀ B_t A_t V_ref (K×K, exact);
2. norm balancing, for the subspace choice only: M̃_t = M_t·(β·c_t + (1−β)·c̄)/c_t, c_t = ‖M_t‖_F;
3. Tucker-2 of stack(M̃_t) with ranks [r, r] by HOOI from an HOSVD start, until the objective
   Σ_t‖PᵀM̃_tQ‖² stops improving (at most `max_iter` sweeps); U = U_ref·P, V = V_ref·Q;
4. coordinates C_t = PᵀM_tQ (r×r) of the un-balanced cores;
5. merge the C_t with the rule, optionally isotropize (singular values → their mean); a spectral rule
   (tsv, iso_c, iso_cts: `spectral.py`) merges the r×r matrices C_t to rank r, as the CtM code's
   `_merge_tensors` does for tsv and iso-cts;
6. output B = λ·U·C, A = Vᵀ, or balanced (SVD C = XΣYᵀ): B = λ·U·X·Σ^½, A = Σ^½·Yᵀ·Vᵀ.

The output rank is at most r by construction; nothing is truncated afterwards, and no m×n is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.schemas.merge import CtmParams
from workers.engines import linalg_pool
from workers.engines.merge.core_space import (
    CoreBasis,
    Factored,
    batches,
    core_bases,
    factored_cores,
    isotropic,
    merged_modules,
    stack_factors,
)
from workers.engines.merge.rules import RuleOptions, is_spectral, is_sum, merge_matrices, merge_matrices_at
from workers.engines.merge.types import MergedModule, MergeJob, RankTarget
from workers.engines.registry import register

HOOI_TOL = 1e-6
# dtype of the HOOI eigensolves (the Grams, products and objective are float64)
EIG_DTYPE = torch.float64


def core_norms(cores: Factored) -> Tensor:
    """‖M_t‖_F per (module, task), (G, T): ‖L_tR_t‖² = Σ (L_tᵀL_t)∘(R_tR_tᵀ)."""
    left, right = cores
    return ((left.mT @ left) * (right @ right.mT)).sum(dim=(-2, -1)).clamp(min=0).sqrt()


def balance(cores: Factored, beta: float) -> Factored:
    """Rescale each task's core to norm β·c_t + (1−β)·c̄ (β in [0, 1]; 1 = unchanged)."""
    norms = core_norms(cores)  # (G, T)
    target = beta * norms + (1.0 - beta) * norms.mean(dim=1, keepdim=True)
    scale = torch.where(norms > 0, target / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0)
    return cores[0] * scale[..., None, None], cores[1]


def _transpose(cores: Factored) -> Factored:
    """The cores M_tᵀ = R_tᵀ·L_tᵀ."""
    return cores[1].mT, cores[0].mT


def _top_eig(sym: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-r eigenpairs of symmetric PSD matrices (G, K, K): (vectors (G,K,r), values (G,r)), descending."""
    values, vectors = linalg_pool.eigh(sym)
    return vectors[..., -r:].flip(-1), values[..., -r:].flip(-1)


def _unfold(cores: Factored, basis: Tensor) -> Tensor:
    """W = [M_1·basis … M_T·basis] (G, d, T·r), so that Σ_t (M_t·basis)(M_t·basis)ᵀ = WWᵀ."""
    left, right = cores
    w = left @ (right @ basis.unsqueeze(1))  # (G, T, d, r)
    return w.permute(0, 2, 1, 3).reshape(w.shape[0], w.shape[2], -1)


def _mode_gram(cores: Factored) -> Tensor:
    """Σ_t M_tM_tᵀ = Σ_t L_t(R_tR_tᵀ)L_tᵀ, (G, d, d): one product over the tasks' stacked factors
    [L_1X_1 … L_TX_T]·[L_1 … L_T]ᵀ (X_t = R_tR_tᵀ), without a (G, T, d, d) intermediate."""
    left, right = cores
    g, t, d, rho = left.shape
    weighted = (left @ (right @ right.mT)).permute(0, 2, 1, 3).reshape(g, d, t * rho)
    return weighted @ left.permute(0, 2, 1, 3).reshape(g, d, t * rho).mT


def _top_space(w: Tensor, r: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The exact top-r eigenspace of S = WWᵀ (W (G,K,N)): a full symmetric eigendecomposition of S formed
    in float64 and solved in `dtype`, as HOOI (tensorly's partial_tucker, the CtM reference) takes each
    half-sweep. Returns (orthonormal vectors (G,K,r) in float64, their eigenvalues (G,r))."""
    vectors, values = _top_eig((w @ w.mT).to(dtype), r)
    return vectors.double(), values.double()


def _fit_errors(objective: Tensor, total: Tensor) -> Tensor:
    """tensorly's reconstruction error of a Tucker fit with orthonormal factors, sqrt(|‖X‖² − ‖core‖²|)/‖X‖
    (0 for an all-zero module)."""
    norm = total.sqrt()
    return torch.where(norm > 0, (total - objective).abs().sqrt() / norm.clamp(min=torch.finfo(norm.dtype).tiny), 0.0)


def _sweeps(
    cores: Factored, p: Tensor, q: Tensor, max_iter: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, list[int]]:
    """Exact HOOI sweeps from (p, q): P ← top-r eigenspace of Σ(M_tQ)(M_tQ)ᵀ, then Q ← top-r eigenspace of
    Σ(M_tᵀP)(M_tᵀP)ᵀ, stopped as tensorly's `partial_tucker` (the CtM reference, tol 1e-6) stops: from the
    third sweep on, when the reconstruction error sqrt(|‖X‖² − Σ_t‖PᵀM_tQ‖²|)/‖X‖ changed by less than
    HOOI_TOL since the previous sweep; or after `max_iter` sweeps. The products and the errors are float64
    (so the stopping decision is the one a float64 reference takes), the eigensolves run in `dtype`.
    Converged modules drop out of the batch. Returns (P, Q, sweeps per module)."""
    total = core_norms(cores).square().sum(dim=1)  # ‖X‖² of each module's tensor
    errors: Tensor | None = None
    sweeps = [0] * p.shape[0]
    active = torch.arange(p.shape[0], device=p.device)
    sub, sub_t = cores, _transpose(cores)
    p_act, q_act = p.clone(), q.clone()
    r_B, r_A = p.shape[-1], q.shape[-1]
    for sweep in range(1, max_iter + 1):
        # P ← top-r eigenspace of Σ (M_tQ)(M_tQ)ᵀ
        p_act, _ = _top_space(_unfold(sub, q_act), r_B, dtype)
        # Q ← top-r eigenspace of Σ (M_tᵀP)(M_tᵀP)ᵀ
        w = _unfold(sub_t, p_act)
        q_act, _ = _top_space(w, r_A, dtype)
        new = _fit_errors((q_act.mT @ w).square().sum(dim=(1, 2)), total)  # from Σ_t‖PᵀM_tQ‖², float64
        going = torch.ones_like(new, dtype=torch.bool)
        if sweep >= 3 and errors is not None:  # tensorly: `if iteration > 1` (0-based), |e_prev − e| < tol
            going = (errors - new).abs() >= HOOI_TOL
        errors = new
        for i in active.tolist():
            sweeps[i] = sweep
        if bool(going.all()):
            continue
        p[active], q[active] = p_act, q_act
        active = active[going]
        if active.numel() == 0:
            break
        sub = (sub[0][going], sub[1][going])
        sub_t = _transpose(sub)
        p_act, q_act, errors, total = p_act[going], q_act[going], errors[going], total[going]
    else:
        p[active], q[active] = p_act, q_act
    return p, q, sweeps


def _objective(cores: Factored, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Σ_t‖PᵀM_tQ‖² per module in float64, with P and Q re-orthonormalised in float64 first; returns
    (P, Q, objective)."""
    p, q = torch.linalg.qr(p.double())[0], torch.linalg.qr(q.double())[0]
    return p, q, (p.mT @ _unfold(cores, q)).square().sum(dim=(1, 2))


def hooi(cores: Factored, ranks: tuple[int, int], max_iter: int) -> tuple[Tensor, Tensor, list[int], Tensor, Tensor]:
    """Tucker-2 (modes 0, 1; ranks [r_B, r_A], both r unless a stack has lower rank) of the stacked float64
    cores by HOOI from an HOSVD start.

    Each half-sweep maximises Σ_t‖PᵀM_tQ‖² over P with Q fixed exactly — P ← the top-r eigenvectors of
    Σ(M_tQ)(M_tQ)ᵀ, a full eigendecomposition as in tensorly's partial_tucker (the CtM reference) — then
    over Q. (A single Rayleigh–Ritz step per half-sweep, used before, follows a different path and ended in
    a different local optimum in 9 of 30 random cases.) A module stops as partial_tucker stops with the CtM
    code's tol=1e-6 (its reconstruction error changed by < 1e-6 from one sweep to the next, from the third
    sweep on) or after `max_iter` sweeps. Everything
    is float64: with float32 eigensolves the stopping decisions drifted from a float64 reference's and 17
    of 30 cases stopped a sweep apart (outputs ~1e-3 apart); exact sweeps also need fewer of them.
    Returns P (G,d_B,r_B), Q (G,d_A,r_A), the sweeps each module ran, and the float64 objective at the
    HOSVD start and at the end (both (G,)).
    """
    r_B, r_A = ranks
    # HOSVD start: top-r eigenvectors of Σ M_tM_tᵀ and Σ M_tᵀM_t
    p, _ = _top_eig(_mode_gram(cores).to(EIG_DTYPE), r_B)
    q, _ = _top_eig(_mode_gram(_transpose(cores)).to(EIG_DTYPE), r_A)
    p, q, start = _objective(cores, p, q)
    p, q, sweeps = _sweeps(cores, p, q, max_iter, EIG_DTYPE)
    p, q, objective = _objective(cores, p, q)
    return p, q, sweeps, start, objective


def tucker_rank(target: RankTarget, balanced: Factored, i: int, rank_B: int, rank_A: int) -> tuple[int, int]:
    """Tucker ranks (r_B, r_A) for module i: r = the target rank, or the smallest r keeping `energy` of
    both mode spectra of the balanced cores; each mode capped by its stack's numerical rank (so a rank
    above the exact one is exact, and the output rank is at most r)."""
    r = target.rank
    if target.energy is not None:
        one = (balanced[0][i : i + 1], balanced[1][i : i + 1])
        ranks = []
        for gram in (_mode_gram(one)[0], _mode_gram(_transpose(one))[0]):
            values = linalg_pool.eigvalsh(gram).flip(-1).clamp(min=0)
            ranks.append(RankTarget(rank=gram.shape[-1], energy=target.energy).choose(values.sqrt()))
        r = max(ranks)
    return max(1, min(r, rank_B)), max(1, min(r, rank_A))


def _uncompressed(
    basis: CoreBasis, ranks: list[int], params: CtmParams, options: RuleOptions, keys: list[str]
) -> Tensor:
    """The same rule's uncompressed merge λ·R of each module's full cores M_t (G, d_B, d_A), in the batch's
    core coordinates: the Core Space merge (spectral rules at the full core rank), isotropic when asked."""
    if is_sum(params.rule):
        merged = basis.coords_B @ basis.coords_A
    else:
        d = max(basis.coords_B.shape[1], basis.coords_A.shape[2])
        merged = merge_matrices_at(
            params.rule, factored_cores(basis.coords_B, basis.coords_A, ranks), options, keys, [[d] * len(keys)]
        )[0]
    return params.lambda_ * (isotropic(merged) if params.isotropize else merged)


@register("merge", "ctm", CtmParams)
@linalg_pool.pool_only()  # the K×K work of many modules: parallel on the pool, one OpenMP thread each
def ctm(job: MergeJob, params: CtmParams) -> dict[str, MergedModule]:
    """Compress-then-Merge every module to its output rank r (≤ r by construction)."""
    options = RuleOptions.from_params(params)
    lam = params.lambda_
    out: dict[str, MergedModule] = {}
    total = max(1, len(job.modules))
    for batch in batches(job.modules):
        stacks = [stack_factors(name, job.factors(name)) for name in batch]
        # 1. core bases and exact cores (singular bases for an entrywise rule: its uncompressed reference is
        # the Core Space merge, which is defined in them; the CtM result itself does not depend on the basis)
        entrywise = not (is_sum(params.rule) or is_spectral(params.rule))
        basis = core_bases(stacks, singular=entrywise)
        uncompressed = _uncompressed(basis, list(stacks[0].ranks), params, options, batch)
        factors = factored_cores(basis.coords_B, basis.coords_A, list(stacks[0].ranks))
        # 2. norm balancing (subspace choice only)
        balanced = balance(factors, params.beta)
        ranks = [
            tucker_rank(job.targets[name], balanced, i, basis.rank_B[i], basis.rank_A[i])
            for i, name in enumerate(batch)
        ]
        parts: dict[int, tuple[Tensor, Tensor]] = {}
        notes: dict[int, dict[str, float | int]] = {}
        for r in sorted(set(ranks)):
            idx = [i for i, ri in enumerate(ranks) if ri == r]
            sub = (balanced[0][idx], balanced[1][idx])
            # 3. Tucker-2 by HOOI from HOSVD: shared subspaces P, Q
            p, q, sweeps, start, final = hooi(sub, r, params.max_iter)
            r_B, r_A = r
            fit_total = core_norms(sub).square().sum(dim=1).clamp(min=torch.finfo(torch.float64).tiny)
            # 4. coordinates of the original cores: C_t = (PᵀL_t)(R_tQ)
            c_t = (p.mT.unsqueeze(1) @ factors[0][idx]) @ (factors[1][idx] @ q.unsqueeze(1))  # (g, T, r_B, r_A)
            g, t = c_t.shape[:2]
            # 5. merge the coordinates with the rule (entrywise, or spectral to rank r), optionally isotropize
            keys = [batch[i] for i in idx]
            merged = merge_matrices(params.rule, c_t, options, keys, [min(r)] * g)
            if params.isotropize:
                merged = isotropic(merged)
            # 6. output factors in weight space
            svd = linalg_pool.svd(merged) if params.balanced else None
            for j, i in enumerate(idx):
                if svd is not None:
                    x, s, yh = svd[0][j], svd[1][j], svd[2][j]
                    k = RankTarget(rank=min(r)).choose(s)
                    root = s[:k].sqrt()
                    left = lam * (p[j] @ (x[:, :k] * root))
                    right = (root.unsqueeze(-1) * yh[:k]) @ q[j].mT
                else:
                    left, right = lam * (p[j] @ merged[j]), q[j].mT
                parts[i] = (left, right)
                notes[i] = {
                    "hooi_sweeps": sweeps[j],
                    "tucker_fit_start": float(start[j] / fit_total[j]),
                    "tucker_fit": float(final[j] / fit_total[j]),
                }
        order = range(len(stacks))
        out.update(merged_modules(stacks, basis, [parts[i] for i in order], uncompressed, [notes[i] for i in order]))
        job.progress(len(out) / total, "compress-then-merge")
        del stacks, basis  # before the next batch is loaded, so its buffers reuse this batch's memory
    return out
