"""Tuning a merge on the user's validation data: the papers' protocol (TIES, KnOTS, Core Space and CtM all
choose λ, top-k and β on a validation split) offered as a service.

For every point of a bounded grid over `lambda`, `density` and `beta`, the merge is run (cheap: core space),
the merged update is applied to the base model and evaluated on each task's validation rows — classifiers:
accuracy (higher is better); causal LMs: mean answer NLL (lower is better) — and normalised by the score of
that task's own adapter on the same rows, as the papers' "normalised accuracy" (acc_merged / acc_own). For a
loss the ratio is inverted (nll_own / nll_merged), so 1 means "as good as the task's own adapter" either way.
The objective is the mean over tasks (the papers') or the worst task; the first best point wins ties.

The model is never copied: `lora_applied` adds ΔW·x = B(Ax) to the named layers' outputs with forward
hooks (any layer whose input is x and output is Wx, including GPT-2's Conv1D), and removes them after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

Factors = Mapping[str, tuple[Tensor, Tensor]]  # module name -> (lora_A (k×n), lora_B (m×k)), scaling folded in


@contextmanager
def lora_applied(model: nn.Module, factors: Factors) -> Iterator[None]:
    """Within the block, each named layer's output gets + B(Ax) (x its input): the model computes with
    W + ΔW, without copying or changing any weight."""
    handles = []

    def hook(a: Tensor, b: Tensor) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
        def add(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            x = inputs[0]
            return output + (x.to(a.dtype) @ a.mT @ b.mT).to(output.dtype)

        return add

    try:
        for name, (a, b) in factors.items():
            layer = model.get_submodule(name)
            device = next(layer.parameters()).device
            handles.append(layer.register_forward_hook(hook(a.to(device), b.to(device))))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, kind: str) -> float:
    """Accuracy on classifier rows (`kind` "accuracy") or mean answer NLL on LM rows (`kind` "nll")."""
    from workers.engines.unlearn.metrics import classifier_outputs, lm_outputs

    device = next(model.parameters()).device
    if kind == "accuracy":
        return float(classifier_outputs(model, data, device)["correct"].float().mean())
    return float(lm_outputs(model, data, device)["nll"].mean())


def normalised(merged: float, own: float, higher_is_better: bool) -> float:
    """merged/own for a score (accuracy), own/merged for a loss (NLL); 1 = as good as the task's own adapter."""
    if higher_is_better:
        return merged / own if own > 0 else (1.0 if merged >= own else 0.0)
    return own / merged if merged > 0 else 1.0


@dataclass
class TuneResult:
    """The chosen point (its index and params update) and the whole table: one row per point with each
    task's raw and normalised score and the objective."""

    best: int
    point: dict[str, float]
    table: list[dict[str, Any]] = field(default_factory=list)


def grid_search(
    points: Sequence[dict[str, float]],
    merge_at: Callable[[dict[str, float]], Factors],
    tasks: Sequence[tuple[int, Callable[[Factors], float]]],
    own: Mapping[int, Factors],
    objective: str,
    higher_is_better: bool,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> TuneResult:
    """Grid search: merge at each point, score every validation task, keep the best normalised objective.

    `tasks` pairs a task (adapter index) with its scorer (factors applied to the base model → score); `own`
    gives each task's own adapter factors, scored once as the normaliser. `progress(done, total)` runs after
    each point (the job's cancellation check lives there, so a cancel stops between points)."""
    own_scores = {t: score(own[t]) for t, score in tasks}
    table: list[dict[str, Any]] = []
    best, best_value = 0, float("-inf")
    for i, point in enumerate(points):
        factors = merge_at(point)
        rows = []
        for t, score in tasks:
            raw = score(factors)
            rows.append({"task": t, "score": raw, "own": own_scores[t],
                         "normalised": normalised(raw, own_scores[t], higher_is_better)})
        values = [row["normalised"] for row in rows]
        value = sum(values) / len(values) if objective == "mean" else min(values)
        table.append({"point": dict(point), "tasks": rows, "objective": value})
        if value > best_value:
            best, best_value = i, value
        progress(i + 1, len(points))
    return TuneResult(best=best, point=dict(points[best]), table=table)
