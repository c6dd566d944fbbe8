"""Tiny seeded LoRA modules and plain dense references for the compression tests (float64 for checks)."""

from __future__ import annotations

import torch
from torch import Tensor

from workers.engines.compress.types import AdapterModule, CompressJob, SizeRule


def module(seed: int, m: int, n: int, r: int, scaling: float = 1.0, rank: int | None = None,
           dtype: torch.dtype = torch.float32) -> AdapterModule:
    """A module of rank `rank` (default r) stored with r columns: B·A has exactly that rank."""
    g = torch.Generator().manual_seed(seed)
    true = r if rank is None else rank
    b = torch.randn(m, true, generator=g) @ torch.randn(true, r, generator=g)
    a = torch.randn(r, n, generator=g) / n**0.5
    return AdapterModule(lora_A=a.to(dtype), lora_B=b.to(dtype), scaling=scaling)


def job(modules: dict[str, AdapterModule], **size) -> CompressJob:
    return CompressJob(modules=modules, size=SizeRule(**size))


def dense(m: AdapterModule) -> Tensor:
    """ΔW = s·B·A in float64."""
    return m.scaling * m.lora_B.double() @ m.lora_A.double()


def out_dense(c) -> Tensor:
    return c.scaling * c.lora_B.double() @ c.lora_A.double()


def best_rank(x: Tensor, k: int) -> Tensor:
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
