"""The exact SVD of a low-rank update from its factors, and its truncation (shared pieces).

For ΔW = s·B·A (B m×r, A r×n): B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), so ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ and the
SVD of the r×r core s·R_B·R_Aᵀ = u·Σ·vᵀ gives the SVD of ΔW: U = Q_B·u, V = Q_A·v. No m×n matrix is formed.

Q_B and Q_A are never formed either (LAPACK's orgqr is most of a thin QR's cost, and slow in float32):
from ΔW·V = U·Σ and A·V = R_Aᵀ·v, the kept left vectors are U_k = B·(s·R_Aᵀ·v_k·Σ_k⁻¹), and likewise
V_kᵀ = (Σ_k⁻¹·u_kᵀ·s·R_B)·A — two thin products with r×k matrices built in float64. The cost per module is
two R-only QRs (geqrf), an r×r SVD and two m×r×k products. The truncation to rank k is the best rank-k
approximation (Eckart–Young), so keeping every direction with σ > 0 reproduces ΔW exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Singular values at or below this fraction of the largest are float32 noise (the factors of a rank-deficient
# update leave ~1e-7·σ_max behind): they are dropped, so a rank-k update is exactly rank k.
RANK_TOL = 1e-6


@dataclass
class Spectrum:
    """ΔW = scaling·lora_B·lora_A, with its singular values (float64, descending, numerical rank only) and what
    `factors` needs to build any truncation: the factors themselves (float32) and the core's R factors and
    singular vectors (float64, r×r)."""

    values: Tensor
    lora_B: Tensor
    lora_A: Tensor
    scaling: float
    r_B: Tensor
    r_A: Tensor
    u: Tensor
    vh: Tensor

    @property
    def rank(self) -> int:
        return int(self.values.numel())

    def energies(self) -> Tensor:
        """σ_j² (float64): the energy each direction carries; they sum to ‖ΔW‖²_F."""
        return self.values.square()

    def tail(self, k: int) -> float:
        """‖ΔW − ΔW_k‖²_F for the rank-k truncation: the energy of the directions it leaves out."""
        return float(self.values[k:].square().sum())

    def factors(self, k: int) -> tuple[Tensor, Tensor]:
        """The rank-k truncation as balanced LoRA factors in float32, lora_B = U_k·√Σ_k (m×k) and
        lora_A = √Σ_k·V_kᵀ (k×n): the best rank-k approximation of ΔW, both factors of the same scale."""
        root = self.values[:k].sqrt()
        right = self.scaling * (self.r_A.mT @ self.vh[:k].mT) / root  # s·R_Aᵀ·v_k·Σ_k^(-1/2), r×k
        left = self.scaling * (self.u[:, :k].mT @ self.r_B) / root[:, None]  # Σ_k^(-1/2)·u_kᵀ·s·R_B, k×r
        return self.lora_B @ right.to(self.lora_B.dtype), left.to(self.lora_A.dtype) @ self.lora_A

    def vectors(self, k: int) -> tuple[Tensor, Tensor]:
        """(U_k, V_kᵀ): the leading k left and right singular vectors, float32."""
        lora_B, lora_A = self.factors(k)
        root = self.values[:k].sqrt().to(lora_B.dtype)
        return lora_B / root, lora_A / root[:, None]


def numerical_rank(values: Tensor) -> int:
    """How many singular values (descending) are above RANK_TOL of the largest; 0 for a zero matrix."""
    if values.numel() == 0 or float(values[0]) <= 0.0:
        return 0
    return int((values > float(values[0]) * RANK_TOL).sum())


def factor_svd(lora_B: Tensor, lora_A: Tensor, scaling: float = 1.0) -> Spectrum:
    """The SVD of scaling·lora_B·lora_A from R-only QRs of both factors and the SVD of the small core."""
    lora_B, lora_A = lora_B.float(), lora_A.float()
    r_b = torch.linalg.qr(lora_B, mode="r").R.double()
    r_a = torch.linalg.qr(lora_A.mT, mode="r").R.double()
    u, s, vh = torch.linalg.svd(scaling * (r_b @ r_a.mT))
    q = numerical_rank(s)
    return Spectrum(values=s[:q].contiguous(), lora_B=lora_B, lora_A=lora_A, scaling=float(scaling), r_B=r_b,
                    r_A=r_a, u=u, vh=vh)
