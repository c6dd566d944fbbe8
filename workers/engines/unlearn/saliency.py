"""Weight-importance helpers shared by SalUn, SFR-on and SSD: gradient sums, diagonal Fisher, top-q masks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from workers.engines.unlearn.data import to_device

BatchLoss = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def _named_grads(model: nn.Module, loss: Tensor, named: list[tuple[str, nn.Parameter]]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads, strict=True)]


def _accumulate(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    batches: Iterable[dict[str, Tensor]],
    loss_fn: BatchLoss,
    device: torch.device,
    power: int,
) -> tuple[dict[str, Tensor], int]:
    """Σ over batches of (∇loss)^power (model in eval mode), per parameter name, and the batch count."""
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named}
    count = 0
    was_training = model.training
    model.eval()
    for batch in batches:
        count += 1
        for (name, _), g in zip(
            named, _named_grads(model, loss_fn(model, to_device(batch, device)), named), strict=True
        ):
            total[name] += g.float() ** power
    model.train(was_training)
    return total, count


def gradient_sum(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    batches: Iterable[dict[str, Tensor]],
    loss_fn: BatchLoss,
    device: torch.device,
) -> dict[str, Tensor]:
    """Σ over batches of ∇loss (model in eval mode), per parameter name."""
    return _accumulate(model, named, batches, loss_fn, device, power=1)[0]


def squared_gradient_mean(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    batches: Iterable[dict[str, Tensor]],
    loss_fn: BatchLoss,
    device: torch.device,
) -> dict[str, Tensor]:
    """Mean over batches of (∇loss)² — the diagonal Fisher / SSD importance — per parameter name."""
    total, count = _accumulate(model, named, batches, loss_fn, device, power=2)
    return {name: value / max(count, 1) for name, value in total.items()}


def top_fraction_mask(scores: dict[str, Tensor], q: float) -> dict[str, Tensor]:
    """1 on the global top-q fraction of coordinates by score, across all tensors (SalUn's mask)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = max(1, int(round(q * flat.numel())))
    threshold = torch.topk(flat, keep, sorted=True).values[-1]
    return {name: (s >= threshold).float() for name, s in scores.items()}
