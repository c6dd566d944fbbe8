"""Spectral merge rules: each acts on whole matrices through their SVDs, so it is exact in core space.

The rules are equivariant under orthogonal changes of basis (rule(U_ref·M_t·V_refᵀ) = U_ref·rule(M_t)·V_refᵀ
for orthonormal U_ref, V_ref), so applying them to the K×K cores M_t = U_refᵀΔW_tV_ref gives exactly the
full-space result at K×K cost, in any orthonormal core basis. `mats` is one module's present tasks
(T, p, q), float64; `rank` is the output rank R (the module's target, at most the numerical rank of the sum).
Triplets with σ ≤ 1e-6·σ_max are never selected: their singular vectors are arbitrary, and selecting them
(as the reference codes do when a block is wider than a task's rank) would make the result depend on how
an SVD completes a null space — then core and full space would differ.

- `tsv` — Task Singular Vectors (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
  Model Merging", CVPR 2025). Code: `AntoAndGar/task_singular_vectors`, `src/utils/TSVM_utils.py`,
  `compute_and_sum_svd_mem_reduction`; the same in `apanariello4/core-space-merging`, `task_merger.py`,
  `get_tsv_delta_w`. Per task the SVD ΔW_t = U_tΣ_tV_tᵀ; keep the top k = ⌊D/T⌋ triplets; stack
  U = [U_1,k … U_T,k], V = [V_1,k … V_T,k], Σ = blockdiag(Σ_t,k); orthogonalise U and V by their polar
  factors (U = PSQᵀ → U⊥ = PQᵀ, the code's `u_u @ v_u`); output U⊥ΣV⊥ᵀ, rank ≤ T·k ≤ D.
  The code takes D = min(m, n) of the matrix it decomposes: full-parameter task vectors fill their whole
  dimension. For LoRA in core space that is D = K = Σr (the core-space code: k = r, output rank Σr); in
  full space it is min(m, n), which keeps null directions (see above). Here D = the output rank R, so the
  T blocks fill the requested rank and nothing is truncated afterwards (the issue's spec); with R = Σr this
  is exactly the core-space code's result. With R < T (k = 1) the T triplets exceed R, and the merge keeps
  the R largest (the exact truncation), so the output rank never exceeds the request.
- `iso_c` — Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025). Code: `danielm1405/iso-merging` (`src/utils/iso.py`, `iso_c`, as
  copied in FusionBench's `isotropic_merging/iso_utils.py`) and core-space-merging's `isotropize_matrix`:
  S = Σ_t ΔW_t, SVD S = UΣVᵀ, every σ replaced by their mean: σ̄·UVᵀ. The code averages all min(m, n)
  singular values (a full-rank sum); here the SVD is truncated to the output rank k first and
  σ̄ = (σ_1 + … + σ_k)/k, so the output has rank k (for k = Σr in core space this is the code's result).
- `iso_cts` — Iso-CTS (same paper and repository, `iso_cts`; default `common_space_fraction` 0.8 from
  `config/method/iso_cts.yaml`). With D the output rank: k_c = ⌊D·f⌋, then the task-specific total is
  rounded to a multiple of T (`round((D − k_c)/T)·T`, Python's round), k_c = D − that total, and each task
  gets n = (D − k_c)/T directions. Common: the top k_c singular triplets of S. Task-specific: the top n
  triplets of ΔW_t − U_cU_cᵀΔW_t. Stack [task blocks…, common], orthogonalise U and V by polar factors,
  and replace all the stacked σ by their mean: output σ̄·U⊥V⊥ᵀ. (With D = 16 and T = 8 the rounding gives
  n = 0: Iso-CTS is Iso-C there, as in the code.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from workers.engines import linalg_pool
from workers.engines.merge.types import RANK_TOL

SVD = tuple[Tensor, Tensor, Tensor]


def _svd(x: Tensor) -> SVD:
    return linalg_pool.svd(x)


def _factored_svd(left: Tensor, right: Tensor) -> SVD:
    """SVD of each product left_t·right_t (left (T,p,ρ), right (T,ρ,q)) from the factors: QRs of the thin
    factors and an SVD of the small ρ×ρ middle, instead of an SVD of each p×q product (min(p, q, ρ) triplets;
    the ones a dense SVD adds are zero)."""
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right.mT)
    x, s, yh = _svd(r_l @ r_r.mT)
    return q_l @ x, s, (q_r @ yh.mT).mT


class TaskMatrices:
    """One module's present tasks' matrices (T, p, q), float64 — dense, or as low-rank factors (left (T,p,ρ),
    right (T,ρ,q), e.g. a module's cores M_t = (U_refᵀB_t)(A_tV_ref)) — with the SVDs the rules take computed
    once, when first asked: a rule evaluated at two ranks (a compressed merge and its uncompressed reference)
    shares them. From factors the per-task SVDs cost ρ×ρ work, not p×q."""

    def __init__(
        self, mats: Tensor | None = None, factors: tuple[Tensor, Tensor] | None = None, sum_svd: SVD | None = None
    ) -> None:
        """`sum_svd`: the SVD of Σ_t M_t when the caller already has it (it chose the output rank on it)."""
        if (mats is None) == (factors is None):
            raise ValueError("give the task matrices either dense or as factors")
        self._mats, self._factors = mats, factors
        self._tasks: SVD | None = None
        self._sum: SVD | None = sum_svd
        self._residuals: dict[int, SVD] = {}

    @property
    def count(self) -> int:
        return int((self._mats if self._mats is not None else self._factors[0]).shape[0])  # type: ignore[index]

    @property
    def shape(self) -> tuple[int, int]:
        if self._mats is not None:
            return int(self._mats.shape[1]), int(self._mats.shape[2])
        left, right = self._factors  # type: ignore[misc]
        return int(left.shape[1]), int(right.shape[2])

    def dense(self) -> Tensor:
        """The matrices (T, p, q)."""
        if self._mats is None:
            left, right = self._factors  # type: ignore[misc]
            self._mats = left @ right
        return self._mats

    def tasks_svd(self) -> SVD:
        """SVD of each task's matrix, batched: (U (T,p,d), S (T,d), Vᴴ (T,d,q))."""
        if self._tasks is None:
            self._tasks = _svd(self.dense()) if self._factors is None else _factored_svd(*self._factors)
        return self._tasks

    def sum_svd(self) -> SVD:
        """SVD of the plain sum Σ_t M_t."""
        if self._sum is None:
            self._sum = _svd(self.dense().sum(dim=0))
        return self._sum

    def residuals_svd(self, common: int) -> SVD:
        """SVD of each task's matrix with the sum's top `common` left singular directions projected out."""
        if common not in self._residuals:
            u_c = self.sum_svd()[0][:, :common]
            if self._factors is None:
                mats = self.dense()
                self._residuals[common] = _svd(mats - u_c @ (u_c.mT @ mats))
            else:
                left, right = self._factors
                self._residuals[common] = _factored_svd(left - u_c @ (u_c.mT @ left), right)
        return self._residuals[common]


def _nonzero(s: Tensor, scale: float) -> int:
    """How many of the descending singular values `s` are above RANK_TOL·scale."""
    return int((s > scale * RANK_TOL).sum()) if scale > 0 else 0


def polar(x: Tensor) -> Tensor:
    """The orthonormal polar factor of x (p×c): x = PSQᵀ → PQᵀ (the closest matrix with orthonormal columns)."""
    u, _, vh = _svd(x)
    return u @ vh


def _orthogonal_merge(
    us: list[Tensor], ss: list[Tensor], vs: list[Tensor], shape: tuple[int, int], iso: bool
) -> Tensor:
    """U⊥·Σ·V⊥ᵀ from stacked triplet blocks (σ replaced by their mean when `iso`)."""
    if not us or sum(int(s.numel()) for s in ss) == 0:
        return us[0].new_zeros(shape) if us else torch.zeros(shape, dtype=torch.float64)
    u, s, v = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    if iso:
        s = torch.full_like(s, float(s.mean()))
    return (polar(u) * s) @ polar(v).mT


def tsv(mats: TaskMatrices, rank: int) -> Tensor:
    """TSV-Merge of one module's task matrices (T, p, q): each task's top ⌊rank/T⌋ triplets, orthogonalised."""
    t = mats.count
    k = max(1, rank // t)
    u, s, vh = mats.tasks_svd()
    scale = float(s.max()) if s.numel() else 0.0
    us, ss, vs = [], [], []
    for i in range(t):
        keep = min(k, _nonzero(s[i], scale))
        us.append(u[i, :, :keep])
        ss.append(s[i, :keep])
        vs.append(vh[i, :keep].mT)
    return _orthogonal_merge(us, ss, vs, mats.shape, iso=False)


def iso_c(mats: TaskMatrices, rank: int) -> Tensor:
    """Iso-C: the sum's top-`rank` singular directions, each with the mean of those singular values."""
    u, s, vh = mats.sum_svd()
    k = min(rank, _nonzero(s, float(s[0]) if s.numel() else 0.0))
    if k == 0:
        return u.new_zeros(mats.shape)
    return (u[:, :k] * s[:k].mean()) @ vh[:k]


def common_split(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """Iso-CTS' split of `rank` directions: (common k_c, per-task n), as the reference code rounds it."""
    common = int(rank * fraction)
    specific = round((rank - common) / tasks) * tasks
    while specific > rank:  # the code's rounding can overshoot for tiny ranks
        specific -= tasks
    return rank - specific, specific // tasks


def iso_cts(mats: TaskMatrices, rank: int, fraction: float = 0.8) -> Tensor:
    """Iso-CTS: common subspace of the sum plus each task's own directions, orthogonalised, isotropic."""
    t = mats.count
    u, s, vh = mats.sum_svd()
    scale = float(s[0]) if s.numel() else 0.0
    common, per_task = common_split(rank, t, fraction)
    common = min(common, _nonzero(s, scale))
    u_c, s_c, v_c = u[:, :common], s[:common], vh[:common].mT
    us, ss, vs = [], [], []
    if per_task > 0:
        u_t, s_t, vh_t = mats.residuals_svd(common)  # each task with the common directions projected out
        top = max(scale, float(s_t.max()) if s_t.numel() else 0.0)
        for i in range(t):
            keep = min(per_task, _nonzero(s_t[i], top))
            us.append(u_t[i, :, :keep])
            ss.append(s_t[i, :keep])
            vs.append(vh_t[i, :keep].mT)
    us.append(u_c)
    ss.append(s_c)
    vs.append(v_c)
    return _orthogonal_merge(us, ss, vs, mats.shape, iso=True)
