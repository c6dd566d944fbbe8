"""The exact SVD of a low-rank update from its factors, and its truncation (shared pieces).

For ΔW = B·A (B m×r, A r×n): B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), so ΔW = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ and the SVD
of the r×r core R_B·R_Aᵀ = U_c·S·V_cᵀ gives the SVD of ΔW: U = Q_B·U_c, V = Q_A·V_c. No m×n matrix is
formed; the cost is two m×r QRs and an r×r SVD. Its truncation to rank k is the best rank-k approximation
(Eckart–Young), so keeping every direction with σ > 0 reproduces ΔW exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Singular values at or below this fraction of the largest are float32 noise (a rank-deficient factor's QR
# leaves ~1e-7·σ_max behind): they are dropped, so a rank-k update is exactly rank k.
RANK_TOL = 1e-6


@dataclass
class Spectrum:
    """ΔW = left · diag(values) · right, exactly, over its numerical rank q: left (m×q) and right (q×n) with
    orthonormal columns / rows (float32), values (q,) descending, float64."""

    left: Tensor
    values: Tensor
    right: Tensor

    @property
    def rank(self) -> int:
        return int(self.values.numel())

    def energies(self) -> Tensor:
        """σ_j² (float64): the energy each direction carries; they sum to ‖ΔW‖²_F."""
        return self.values.square()

    def factors(self, k: int) -> tuple[Tensor, Tensor]:
        """The rank-k truncation as balanced LoRA factors (lora_B = U_k·√S_k, lora_A = √S_k·V_kᵀ): the
        best rank-k approximation of ΔW, with both factors of the same scale (kind to low-precision storage)."""
        root = self.values[:k].sqrt().to(self.left.dtype)
        return self.left[:, :k] * root, root[:, None] * self.right[:k]


def numerical_rank(values: Tensor) -> int:
    """How many singular values (descending) are above RANK_TOL of the largest; 0 for a zero matrix."""
    if values.numel() == 0 or float(values[0]) <= 0.0:
        return 0
    return int((values > float(values[0]) * RANK_TOL).sum())


def factor_svd(lora_B: Tensor, lora_A: Tensor) -> Spectrum:
    """The SVD of lora_B @ lora_A (float32 factors) from QR of both factors and the SVD of the small core."""
    q_b, r_b = torch.linalg.qr(lora_B)
    q_a, r_a = torch.linalg.qr(lora_A.mT)
    core = r_b.double() @ r_a.double().mT
    u, s, vh = torch.linalg.svd(core)
    q = numerical_rank(s)
    left = q_b @ u[:, :q].to(q_b.dtype)
    right = (q_a @ vh[:q].mT.to(q_a.dtype)).mT
    return Spectrum(left=left, values=s[:q].contiguous(), right=right.contiguous())
