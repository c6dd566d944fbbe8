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

from collections.abc import Callable, Iterable
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


def sign_conflict_counts(values: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """Per (group, task): (entries whose sign opposes the elected sign, non-zero entries), both (G, T)."""
    against = values * sign.unsqueeze(1) < 0  # sign is ±1: negative exactly for non-zero opposing entries
    return against.sum(dim=-1), (values != 0).sum(dim=-1)


def sign_conflicts(values: Tensor, sign: Tensor) -> Tensor:
    """Per (group, task): fraction of the task's non-zero entries whose sign opposes the elected sign, in
    [0, 1] (0 for a task with no non-zero entries). Shape (G, T)."""
    against, nonzero = sign_conflict_counts(values, sign)
    return against.double() / nonzero.clamp(min=1).double()


_HALF = 1 << 16


def _select(counts: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """Per task, the bin holding each 0-based descending rank and the rank within that bin.
    counts (T, B) histograms over ascending bins; ranks (T, R). Returns (bins, ranks within) both (T, R)."""
    from_top = counts.flip(-1).cumsum(-1)  # entries in the top j+1 bins
    index = torch.searchsorted(from_top, ranks.contiguous(), right=True).clamp(max=counts.shape[-1] - 1)
    above = from_top.gather(-1, index) - counts.flip(-1).gather(-1, index)
    return counts.shape[-1] - 1 - index, ranks - above


def streamed_magnitudes(chunks: Callable[[], Iterable[Tensor]], ranks_for: Callable[[int], list[int]]) -> Tensor:
    """Each task's entry magnitudes at given descending ranks, over entries streamed in chunks (T, N_i) of
    float32 — exactly, in two passes over the chunks, without holding them (radix selection: a non-negative
    float32 orders as its bit pattern, so one pass counts the high 16 bits, the next the low 16 bits within
    the chosen bins). `ranks_for(N)` gives the 0-based ranks R (each in [0, N)) once the entries per task N
    are counted. Returns (T, R) float32 magnitudes; the rank-0 magnitude is the largest."""
    counts: Tensor | None = None
    for chunk in chunks():
        high = chunk.abs().contiguous().view(torch.int32) >> 16
        offsets = torch.arange(chunk.shape[0], device=chunk.device).unsqueeze(-1) * _HALF
        found = torch.bincount((high + offsets).flatten(), minlength=chunk.shape[0] * _HALF).view(-1, _HALF)
        if counts is not None and counts.shape != found.shape:
            raise ValueError("every chunk must have the same tasks (rows)")
        counts = found if counts is None else counts + found
    if counts is None:
        raise ValueError("no entries to rank")
    device = counts.device
    ranks = torch.tensor(ranks_for(int(counts[0].sum())), device=device).expand(counts.shape[0], -1)
    bins, within = _select(counts, ranks)
    tasks, width = counts.shape[0], ranks.shape[1]
    lows = torch.zeros(tasks * width * _HALF + 1, dtype=torch.int64, device=device)  # the last bin: the rest
    slots = (torch.arange(tasks, device=device).unsqueeze(-1) * width + torch.arange(width, device=device)) * _HALF
    for chunk in chunks():
        bits = chunk.abs().contiguous().view(torch.int32)
        high, low = bits >> 16, bits & (_HALF - 1)
        for r in range(width):
            index = torch.where(high == bins[:, r : r + 1], low + slots[:, r : r + 1], tasks * width * _HALF)
            lows += torch.bincount(index.flatten(), minlength=lows.numel())
    lows = lows[:-1].view(tasks, width, _HALF)
    values = torch.empty(ranks.shape, dtype=torch.int32, device=device)
    for r in range(ranks.shape[1]):
        low_bin, _ = _select(lows[:, r], within[:, r : r + 1])
        values[:, r] = ((bins[:, r] << 16) | low_bin[:, 0]).to(torch.int32)
    return values.view(torch.float32)
