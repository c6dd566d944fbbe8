"""Tiny seeded factors and plain dense references for the merge tests (float64 where it helps the check)."""

from __future__ import annotations

import torch
from torch import Tensor

from workers.engines.merge.types import TaskFactors


def make_tasks(seed: int, m: int, n: int, ranks: list[int], scale: float = 1.0) -> list[TaskFactors]:
    g = torch.Generator().manual_seed(seed)
    return [
        TaskFactors(lora_A=torch.randn(r, n, generator=g), lora_B=torch.randn(m, r, generator=g) * scale) for r in ranks
    ]


def delta(f: TaskFactors) -> Tensor:
    return f.lora_B.double() @ f.lora_A.double()


def dense(module) -> Tensor:
    """ΔW of a merged module, float64."""
    return module.lora_B.double() @ module.lora_A.double()


def best_rank(x: Tensor, k: int) -> Tensor:
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def plain_ties(values: Tensor, density: float) -> Tensor:
    """TIES on (T, N), written plainly: trim per task, elect sign from the sum, disjoint mean."""
    t, n = values.shape
    k = int(density * n)
    trimmed = torch.zeros_like(values)
    for i in range(t):
        if k > 0:
            idx = values[i].abs().topk(k).indices
            trimmed[i, idx] = values[i, idx]
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(values.dtype)
    out = torch.zeros(n, dtype=values.dtype)
    for j in range(n):
        agree = [float(trimmed[i, j]) for i in range(t) if trimmed[i, j] != 0 and torch.sign(trimmed[i, j]) == sign[j]]
        out[j] = sum(agree) / len(agree) if agree else 0.0
    return out


def core_space(tasks: list[TaskFactors]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """U_ref, V_ref by SVD of the stacks, and the cores M_t = U_refᵀ B_t A_t V_ref (plain, float64)."""
    b = torch.cat([f.lora_B.double() for f in tasks], 1)
    a = torch.cat([f.lora_A.double() for f in tasks], 0)
    u = torch.linalg.svd(b, full_matrices=False)[0]
    v = torch.linalg.svd(a, full_matrices=False)[2].mT
    return u, v, [u.mT @ delta(f) @ v for f in tasks]
