"""GU: project the forget gradient off the span of per-sample retain gradients (arXiv 2511.17100).

Euclidean form of `Lemutisme/geo-unlearning:src/trainer/unlearn/orthograd.py`. As there, the B_r vectors are
the per-sample task-loss gradients of the rows of the step's own retain batch, taken in train mode
(`_collect_retain_gradients`; the loop, `loop.py`, takes the first `gu_retain_samples` rows). When the method
masks its forget gradient (SalUn, SFR-on), the loop masks it and the retain gradients first and projects last,
so the update applied stays inside the mask and orthogonal to the retain gradients. Orthonormalise the B_r
flattened retain gradients by two-pass Gram–Schmidt, dropping a direction whose residual is ≤ 1e-8 of its
norm (float64 input; float32 gradients use a floor of 16 ulp ≈ 1.9e-6, since rounding alone leaves ~1e-7
and a normalised rounding error is not a retain direction), then g_f⊥ = g_f − Q(Qᵀg_f). The preserved-
signal ratio ‖g_f⊥‖/‖g_f‖ is logged. Costs B_r extra backward passes and (B_r + 2)·|θ| floats: keep B_r
small or train LoRA parameters only.
"""

from __future__ import annotations

import torch
from torch import Tensor

RESIDUAL_TOL = 1e-8


def orthonormal_basis(vectors: list[Tensor], tol: float = RESIDUAL_TOL) -> Tensor:
    """Rows of Q (k, d), k ≤ len(vectors): two-pass Gram–Schmidt, near-dependent directions dropped."""
    basis: list[Tensor] = []
    for vector in vectors:
        relative = max(tol, 16 * torch.finfo(vector.dtype).eps) if vector.is_floating_point() else tol
        v = vector.double()
        scale = float(v.norm())
        for _ in range(2):  # re-orthogonalise once: classical GS loses orthogonality in one pass
            for q in basis:
                v = v - (q @ v) * q
        norm = v.norm()
        if scale > 0 and norm > relative * scale:
            basis.append(v / norm)
    if not basis:
        return vectors[0].new_zeros((0, vectors[0].numel())).double()
    return torch.stack(basis)


def project_off(gradient: Tensor, basis: Tensor) -> Tensor:
    """g − Q(Qᵀg): the part of `gradient` orthogonal to every row of `basis`."""
    if basis.shape[0] == 0:
        return gradient
    g = gradient.double()
    return (g - basis.T @ (basis @ g)).to(gradient.dtype)


def kept_fraction(gradient: Tensor, projected: Tensor) -> float:
    """‖g⊥‖/‖g‖ (1.0 for a zero gradient)."""
    norm = float(gradient.double().norm())
    return float(projected.double().norm()) / norm if norm > 0 else 1.0
