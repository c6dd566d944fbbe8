"""Shared pruning and sign rules (TIES, DARE, breadcrumbs), in the style of PEFT's `merge_utils`.

Every function works on a batch `values` of shape (G, T, N): G independent groups (modules merged
together, or one whole adapter for KnOTS), T tasks, N entries per task. Variants are configurations of
one implementation: `sparsify(values, method, ...)` with method `magnitude` (TIES / magnitude prune),
`random` (DARE) or `breadcrumbs`.

- TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
- DARE: Yu et al., "Language Models are Super Mario", ICML 2024.
- Breadcrumbs: Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Sparsifier = Literal["magnitude", "random", "breadcrumbs"]
SignMethod = Literal["total", "frequency"]


def _rank_mask(values: Tensor, start: int, count: int) -> Tensor:
    """Mask of the entries ranked [start, start + count) by magnitude, per (group, task) row."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    if count <= 0:
        return mask
    order = values.abs().argsort(dim=-1, descending=True, stable=True)
    mask.scatter_(-1, order[..., start : start + count], True)
    return mask


def magnitude_mask(values: Tensor, density: float) -> Tensor:
    """Keep the top `int(density·N)` entries by magnitude per task. density in [0, 1]; 0 keeps none."""
    n = values.shape[-1]
    k = int(density * n)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask.scatter_(-1, values.abs().topk(k, dim=-1).indices, True)
    return mask


def breadcrumbs_mask(values: Tensor, density: float, gamma: float) -> Tensor:
    """Drop the largest `int(gamma·N)` entries and keep the next `int(density·N)`; gamma + density ≤ 1."""
    n = values.shape[-1]
    return _rank_mask(values, int(gamma * n), int(density * n))


def random_mask(values: Tensor, density: float, generators: list[torch.Generator]) -> Tensor:
    """Keep each entry with probability `density` (DARE); one seeded generator per group."""
    if density >= 1.0:
        return torch.ones_like(values, dtype=torch.bool)
    draws = torch.stack(
        [torch.rand(values.shape[1:], generator=g, device=values.device, dtype=torch.float64) for g in generators]
    )
    return draws < density


def sparsify(
    values: Tensor,
    method: Sparsifier,
    density: float,
    gamma: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> Tensor:
    """Prune `values` (G, T, N) per task; `random` also rescales the survivors by 1/density.

    density in [0, 1]: 1 keeps everything, 0 gives exact zeros (never NaN).
    """
    if method == "magnitude":
        return values * magnitude_mask(values, density)
    if method == "breadcrumbs":
        return values * breadcrumbs_mask(values, density, gamma)
    # random (DARE): keep with probability density, rescale by 1/density
    if density <= 0.0:
        return torch.zeros_like(values)
    if generators is None:
        generators = [torch.Generator(device=values.device).manual_seed(0) for _ in range(values.shape[0])]
    return values * random_mask(values, density, generators) / density


def elect_sign(values: Tensor, method: SignMethod = "total") -> Tensor:
    """Elected sign per entry, (G, N) of ±1: sign of the summed values (`total`) or of the summed signs
    (`frequency`); a tie goes to +1, as in PEFT."""
    summed = values.sum(dim=1) if method == "total" else values.sign().sum(dim=1)
    return torch.where(summed >= 0, 1.0, -1.0).to(values.dtype)


def disjoint_mean(values: Tensor, sign: Tensor) -> Tensor:
    """Mean over the tasks whose entry is non-zero and agrees with the elected sign, (G, N)."""
    agree = values.sign() == sign.unsqueeze(1)
    total = (values * agree).sum(dim=1)
    return total / agree.sum(dim=1).clamp(min=1)


def sign_conflicts(values: Tensor, sign: Tensor) -> Tensor:
    """Per (group, task): fraction of the task's non-zero entries whose sign opposes the elected sign, in
    [0, 1] (0 for a task with no non-zero entries). Shape (G, T)."""
    nonzero = values != 0
    against = values * sign.unsqueeze(1) < 0  # sign is ±1: negative exactly for non-zero opposing entries
    return against.sum(dim=-1).double() / nonzero.sum(dim=-1).clamp(min=1).double()
