"""Core space: lossless shared bases of the stacked factors and the small Tr×Tr cores (shared pieces).

Panariello, Marczak et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025;
also step 1 of CtM (He et al., ICML 2026). Per module, with B_s = [B_1 … B_T] (m×K), A_s = [A_1; …; A_T]
(K×n), K = Σ r_t:

- U_ref = left singular vectors of B_s, V_ref = right singular vectors of A_s;
- cores M_t = (U_refᵀB_t)(A_tV_ref) (K×K), exact: U_ref M_t V_refᵀ = B_tA_t;
- the exact rank-k truncation of U_ref·C·V_refᵀ is the truncated SVD of the K×K core C (Eckart–Young).

No m×n matrix is formed. The bases come from the K×K Gram matrices: with B_sᵀB_s = Z S² Zᵀ,
U_ref = B_s Z S⁻¹ and U_refᵀB_s = S Zᵀ, so U_ref is never materialised; outputs are lifted with one
(m×K)·(K×k) product. The Gram is formed in float32 (one GEMM) and redone in float64 only for modules whose
spectrum has directions below float32's reach (near rank-deficient stacks). Directions with σ ≤ 1e-6·σ_max
are dropped (their coordinates are zero), so rank-deficient stacks stay exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workers.engines import linalg_pool
from workers.engines.merge.types import RANK_TOL, MergedModule, ModuleGrams, RankTarget, TaskFactors

# Eigenvalues of a float32 Gram below this fraction of the largest are unreliable: redo in float64.
_FP32_RELIABLE = 1e-4
_EIG_TOL = RANK_TOL**2


@dataclass
class StackedFactors:
    """One module's present tasks stacked: lora_B (m×K), lora_A (K×n); `tasks` = global task indices."""

    name: str
    lora_B: Tensor
    lora_A: Tensor
    ranks: tuple[int, ...]
    tasks: tuple[int, ...]

    @property
    def slices(self) -> list[slice]:
        return spans(self.ranks)


def spans(ranks: Sequence[int]) -> list[slice]:
    """Each task's slice of the stacked ranks: ranks (2, 3) -> [0:2, 2:5]."""
    bounds = [0, *itertools.accumulate(ranks)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _adjacent(parts: list[Tensor], dim: int) -> Tensor | None:
    """The whole buffer when `parts` are consecutive slices (along `dim`) of one row-major 2-D tensor, as
    the adapter reader produces them; None otherwise (then the parts are concatenated)."""
    first = parts[0]
    rows, cols = first.shape
    total = sum(int(p.shape[dim]) for p in parts)
    full = (rows, total) if dim == 1 else (total, cols)
    if first.stride() != (full[1], 1):
        return None
    pointer = first.data_ptr()
    for part in parts:
        if part.data_ptr() != pointer or part.stride() != first.stride() or part.dtype != first.dtype:
            return None
        pointer += (part.shape[1] if dim == 1 else part.shape[0] * cols) * part.element_size()
    return first.as_strided(full, (full[1], 1))


def stack_factors(name: str, tasks: Sequence[TaskFactors | None]) -> StackedFactors:
    """Concatenate the present tasks' factors of one module (B side by side, A on top of each other);
    factors that already are adjacent slices of one buffer are used in place, without a copy."""
    present = [(t, f) for t, f in enumerate(tasks) if f is not None]
    parts_B, parts_A = [f.lora_B for _, f in present], [f.lora_A for _, f in present]
    lora_B, lora_A = _adjacent(parts_B, 1), _adjacent(parts_A, 0)
    return StackedFactors(
        name=name,
        lora_B=lora_B if lora_B is not None else torch.cat(parts_B, dim=1),
        lora_A=lora_A if lora_A is not None else torch.cat(parts_A, dim=0),
        ranks=tuple(f.rank for _, f in present),
        tasks=tuple(t for t, _ in present),
    )


@dataclass
class CoreBasis:
    """Core-space bases of G modules that share K (all float64, batched on the first axis).

    coords_B = U_refᵀB_s (G,d_B,K), coords_A = A_sV_ref (G,K,d_A) (d_B = min(m, K), d_A = min(n, K) for
    singular bases, K for triangular ones), lift_B with U_ref = B_s·lift_B,
    lift_A with V_refᵀ = lift_A·A_s; gram_B, gram_A the Grams; rank_B, rank_A the numerical ranks.
    """

    coords_B: Tensor
    coords_A: Tensor
    lift_B: Tensor
    lift_A: Tensor
    gram_B: Tensor
    gram_A: Tensor
    rank_B: list[int]
    rank_A: list[int]


_GRAM_PANELS = 4


def gram(x: Tensor, rows: bool, dtype: torch.dtype) -> Tensor:
    """x·xᵀ (`rows`) or xᵀ·x in `dtype`. The Gram is symmetric, so only its upper block panels are multiplied
    and mirrored: with 4 panels that is 5/8 of the full product's work (about 30% less time on one core)."""
    cols = x.to(dtype).mT if rows else x.to(dtype)  # Gram = colsᵀ·cols, cols is tall (m × K)
    k = cols.shape[1]
    if k < 16 * _GRAM_PANELS:
        return cols.mT @ cols
    gram = cols.new_empty(k, k)
    bounds = [k * i // _GRAM_PANELS for i in range(_GRAM_PANELS + 1)]
    for lo, hi in itertools.pairwise(bounds):
        panel = cols[:, lo:hi].mT @ cols[:, lo:]
        gram[lo:hi, lo:] = panel
        gram[lo:, lo:hi] = panel.mT
    return gram


def _grams(mats: list[Tensor], rows: bool) -> Tensor:
    """The float32 Grams of a batch's stacks (one module per one-thread pool worker), as float64 (G, K, K)."""
    return torch.stack(linalg_pool.map_each(lambda x: gram(x, rows, torch.float32), mats)).double()


def _eig_basis(grams: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """From PSD Grams (G,K,K) float64 = Z S² Zᵀ: (Z, S, S⁺, ranks), eigenvalues sorted descending."""
    lam, z = linalg_pool.eigh(grams)
    lam, z = lam.flip(-1), z.flip(-1)
    top = lam[:, :1].clamp(min=torch.finfo(torch.float64).tiny)
    keep = lam > top * _EIG_TOL
    s = lam.clamp(min=0).sqrt() * keep
    s_inv = torch.where(keep, 1.0 / s.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return z, s, s_inv, [int(k) for k in keep.sum(-1)]


def _basis(mats: list[Tensor], rows: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """Grams of each module's stack and their eigenbases: (gram, Z, S, S⁺, ranks).

    The Gram is one float32 GEMM; modules whose spectrum reaches below float32's resolution are redone in
    float64 (near rank-deficient stacks), so kept directions are accurate and null directions are dropped.
    """
    grams = _grams(mats, rows)
    z, s, s_inv, ranks = _eig_basis(grams)
    smallest = s[:, -1].square() if s.shape[-1] else s[:, 0]
    top = s[:, 0].square().clamp(min=torch.finfo(torch.float64).tiny)
    redo = torch.nonzero(smallest / top < _FP32_RELIABLE).flatten().tolist()
    if redo:
        grams[redo] = torch.stack([gram(mats[i], rows, torch.float64) for i in redo])
        z[redo], s[redo], s_inv[redo], fixed = _eig_basis(grams[redo])
        for i, r in zip(redo, fixed, strict=True):
            ranks[i] = r
    return grams, z, s, s_inv, ranks


def _cholesky_basis(grams: Tensor) -> tuple[Tensor, Tensor, list[int]] | None:
    """Triangular bases (the R of a QR of the stack) from float64 Grams G = L Lᵀ: (coords = Lᵀ, lift = L⁻ᵀ).

    Returns None when a Gram is not safely positive definite in float32 terms (then the eigenbasis path,
    which handles rank deficiency, is used). That is decided on the Gram's eigenvalues (float32 suffices at
    this threshold): Cholesky's pivots do not reveal it — a rank-3 4×4 float32 Gram had pivots
    [1.0, 0.99, 5e-4, 3e-3] and eigenvalues down to 5e-8, and its noise became a spurious 4th direction.
    """
    spectrum = linalg_pool.eigvalsh(grams.float())
    if bool((spectrum[:, 0] < spectrum[:, -1] * _FP32_RELIABLE).any()):
        return None
    chol, info = torch.linalg.cholesky_ex(grams)
    if bool((info != 0).any()):
        return None
    eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device).expand_as(grams)
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return chol.mT, inv.mT, [grams.shape[-1]] * grams.shape[0]


def core_bases(stacks: Sequence[StackedFactors], singular: bool = True) -> CoreBasis:
    """Bases and core coordinates of modules sharing the same K (step 1 of Core Space / CtM).

    `singular=True` uses the singular-vector bases of the paper (needed when a rule acts on individual core
    entries, e.g. TIES in core space). `singular=False` allows any orthonormal bases (a QR of the stacks,
    via a Cholesky of the Gram): exact and cheaper for results that do not depend on the basis (linear
    rules, CtM's Tucker subspaces, KnOTS' SVD); it falls back to the singular bases when ill-conditioned.
    """
    mats_B, mats_A = [s.lora_B for s in stacks], [s.lora_A for s in stacks]
    if not singular:
        gram_B, gram_A = _grams(mats_B, rows=False), _grams(mats_A, rows=True)
        tri_B, tri_A = _cholesky_basis(gram_B), _cholesky_basis(gram_A)
        if tri_B is not None and tri_A is not None:
            return CoreBasis(
                coords_B=tri_B[0],  # R_B = U_refᵀ B_s
                coords_A=tri_A[0].mT,  # R_Aᵀ = A_s V_ref
                lift_B=tri_B[1],  # R_B⁻¹
                lift_A=tri_A[1].mT,  # R_A⁻ᵀ
                gram_B=gram_B,
                gram_A=gram_A,
                rank_B=tri_B[2],
                rank_A=tri_A[2],
            )
    gram_B, z_B, s_B, s_B_inv, rank_B = _basis(mats_B, rows=False)
    gram_A, z_A, s_A, s_A_inv, rank_A = _basis(mats_A, rows=True)
    # a thin SVD has min(m, K) left and min(n, K) right singular vectors: keep that many (descending)
    d_B = min(int(mats_B[0].shape[0]), gram_B.shape[-1])
    d_A = min(int(mats_A[0].shape[1]), gram_A.shape[-1])
    z_B, s_B, s_B_inv = z_B[..., :d_B], s_B[..., :d_B], s_B_inv[..., :d_B]
    z_A, s_A, s_A_inv = z_A[..., :d_A], s_A[..., :d_A], s_A_inv[..., :d_A]
    return CoreBasis(
        coords_B=s_B.unsqueeze(-1) * z_B.mT,  # S Zᵀ = U_refᵀ B_s
        coords_A=z_A * s_A.unsqueeze(-2),  # Z_A S_A = A_s V_ref
        lift_B=z_B * s_B_inv.unsqueeze(-2),  # Z S⁻¹
        lift_A=s_A_inv.unsqueeze(-1) * z_A.mT,  # S_A⁻¹ Z_Aᵀ
        gram_B=gram_B,
        gram_A=gram_A,
        rank_B=rank_B,
        rank_A=rank_A,
    )


def task_cores(basis: CoreBasis, span: slice) -> Tensor:
    """One task's cores M_t = (U_refᵀB_t)(A_tV_ref) for every module of the batch, (G, K, K), float64;
    `span` is the task's slice of the stacked ranks."""
    return basis.coords_B[:, :, span] @ basis.coords_A[:, span, :]


Factored = tuple[Tensor, Tensor]


def factored_cores(coords_B: Tensor, coords_A: Tensor, ranks: list[int]) -> Factored:
    """The cores as low-rank factors M_t = L_t·R_t: L (G,T,d_B,ρ) with L_t = U_refᵀB_t, R (G,T,ρ,d_A) with
    R_t = A_tV_ref, ρ = max r_t (smaller ranks zero-padded, which leaves every product unchanged).

    HOOI only ever multiplies cores by thin matrices, so it works on these factors: T·d·ρ·r flops per
    product instead of T·d²·r, and no (G,T,d,d) stack is formed.
    """
    g, d_B, _ = coords_B.shape
    d_A = coords_A.shape[-1]
    rho = max(ranks)
    left = coords_B.new_zeros(g, len(ranks), d_B, rho)
    right = coords_A.new_zeros(g, len(ranks), rho, d_A)
    for t, span in enumerate(spans(ranks)):
        r = span.stop - span.start
        left[:, t, :, :r] = coords_B[:, :, span]
        right[:, t, :r, :] = coords_A[:, span, :]
    return left, right


def cores(basis: CoreBasis, ranks: Sequence[int]) -> Tensor:
    """Per-task cores M_t = (U_refᵀB_t)(A_tV_ref), shape (G, T, K, K), float64."""
    return torch.stack([task_cores(basis, span) for span in spans(ranks)], dim=1)


def truncate(core: Tensor, targets: Sequence[RankTarget], isotropic: bool = False) -> list[tuple[Tensor, Tensor]]:
    """Exact truncation of each core C (G,K,K) to its target rank k: (XΣ^½ (K×k), Σ^½Yᵀ (k×K)).

    The SVD of the K×K core is the SVD of the merged update (bases are orthonormal), so this is the
    Eckart–Young optimum; a rank above the numerical rank gives the exact update. The left singular pairs
    come from the symmetric eigendecomposition of CCᵀ (float64), and Yᵀ = Σ⁻¹XᵀC for the kept ones.
    `isotropic` replaces the k kept singular values by their mean (`isotropize`, Iso-C's flattening).
    """
    lam, x = linalg_pool.eigh(core @ core.mT)
    s = lam.flip(-1).clamp(min=0).sqrt()
    x = x.flip(-1)
    out = []
    for i, target in enumerate(targets):
        k = target.choose(s[i])
        if float(s[i, 0]) <= 0.0:  # zero update: one zero direction
            out.append((core.new_zeros(core.shape[-2], 1), core.new_zeros(1, core.shape[-1])))
            continue
        yh = (x[i, :, :k].mT @ core[i]) / s[i, :k].unsqueeze(-1)
        kept = s[i, :k].mean().expand(k) if isotropic else s[i, :k]
        root = kept.sqrt()
        out.append((x[i, :, :k] * root, root.unsqueeze(-1) * yh))
    return out


def compression(left: Tensor, right: Tensor, reference: Tensor) -> tuple[float, float]:
    """(‖R‖², ‖left·right − R‖²) for an output and the uncompressed merge R in the same orthonormal core
    coordinates (so the norms are those of the weight-space updates)."""
    return float(reference.square().sum()), float((left @ right - reference).square().sum())


def isotropic(core: Tensor) -> Tensor:
    """Each matrix (…, p, q) with its non-zero singular values replaced by their mean (Iso-C's flattening)."""
    x, s, yh = linalg_pool.svd(core)
    keep = s > s[..., :1] * RANK_TOL
    mean = (s * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1)
    return x @ ((mean * keep).unsqueeze(-1) * yh)


def lift(stack: StackedFactors, basis: CoreBasis, i: int, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Weight-space factors of U_ref·left·right·V_refᵀ: lora_B = B_s·(lift_B·left), lora_A = (right·lift_A)·A_s.

    Returns (lora_B (m×k), lora_A (k×n)) in the stack's dtype, and fills nothing else.
    """
    coef_B = (basis.lift_B[i] @ left).to(stack.lora_B.dtype)
    coef_A = (right @ basis.lift_A[i]).to(stack.lora_A.dtype)
    return stack.lora_B @ coef_B, coef_A @ stack.lora_A


def lifted_grams(basis: CoreBasis, i: int, left: Tensor, right: Tensor) -> ModuleGrams:
    """The report's Gram matrices of an output lifted from core coordinates, from K×K matrices only."""
    coef_B = basis.lift_B[i] @ left  # B_o = B_s coef_B
    coef_A = right @ basis.lift_A[i]  # A_o = coef_A A_s
    cross_B = coef_B.mT @ basis.gram_B[i]
    cross_A = coef_A @ basis.gram_A[i]
    return ModuleGrams(
        gram_B=basis.gram_B[i],
        gram_A=basis.gram_A[i],
        cross_B=cross_B,
        cross_A=cross_A,
        out_B=cross_B @ coef_B,
        out_A=cross_A @ coef_A.mT,
    )


def merged_modules(
    stacks: Sequence[StackedFactors],
    basis: CoreBasis,
    parts: Sequence[tuple[Tensor, Tensor]],
    uncompressed: Tensor,
    notes: Sequence[dict[str, Any]] | None = None,
) -> dict[str, MergedModule]:
    """The outputs of a batch from core coordinates: module i's (left, right) = parts[i] lifted to weight space
    (`lift`, with the report's Grams, `lifted_grams`), its compression against the same rule's uncompressed
    merge uncompressed[i], and the method's notes[i] for the report. The modules go side by side on one-thread
    pool workers: each lift is two thin products too small to keep two threads busy on its own."""

    def one(i: int) -> MergedModule:
        left, right = parts[i]
        lora_B, lora_A = lift(stacks[i], basis, i, left, right)
        return MergedModule(
            lora_A=lora_A,
            lora_B=lora_B,
            compression=compression(left, right, uncompressed[i]),
            grams=lifted_grams(basis, i, left, right),
            report=dict(notes[i]) if notes is not None else {},
        )

    return dict(zip((s.name for s in stacks), linalg_pool.map_each(one, range(len(stacks))), strict=True))


def batches(modules: Mapping[str, Sequence[TaskFactors | None]], chunk: int = 32) -> list[list[str]]:
    """Module names in batches whose present tasks and ranks agree (so their cores share K, and their
    singular bases min(m, K) and min(n, K)), ≤ `chunk` per batch, so only one batch of stacked factors is
    alive at a time."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, tasks in modules.items():
        present = [(t, f) for t, f in enumerate(tasks) if f is not None]
        k = sum(f.rank for _, f in present)
        m, n = int(present[0][1].lora_B.shape[0]), int(present[0][1].lora_A.shape[1])
        key = (tuple((t, f.rank) for t, f in present), min(m, k), min(n, k))
        groups.setdefault(key, []).append(name)
    return [g[i : i + chunk] for g in groups.values() for i in range(0, len(g), chunk)]
