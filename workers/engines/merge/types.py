"""What a merge method takes and returns, per module, in PEFT's words."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Relative threshold below which a singular value counts as zero: the factors are float32 data.
RANK_TOL = 1e-6


@dataclass(frozen=True)
class TaskFactors:
    """One adapter's factors for one module, in float32, ΔW_t = lora_B @ lora_A.

    `lora_B` already carries the adapter's scaling (alpha/r, or alpha/√r for rsLoRA) and the job's weight
    for that adapter, so every method sees plain products. fan_in_fan_out layers arrive transposed to the
    (out, in) orientation.
    """

    lora_A: Tensor  # (r_t, n)
    lora_B: Tensor  # (m, r_t)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


@dataclass
class ModuleGrams:
    """Small Gram matrices (float64) from which the data-free report is computed without forming m×n.

    With B_s = [B_1 … B_T] (m×K), A_s = [A_1; …; A_T] (K×n) and the output factors B_o (m×k), A_o (k×n):
    `gram_B` = B_sᵀB_s, `gram_A` = A_sA_sᵀ (K×K), `cross_B` = B_oᵀB_s, `cross_A` = A_oA_sᵀ (k×K),
    `out_B` = B_oᵀB_o, `out_A` = A_oA_oᵀ (k×k). The report stacks those of several modules on a leading axis.
    """

    gram_B: Tensor
    gram_A: Tensor
    cross_B: Tensor
    cross_A: Tensor
    out_B: Tensor
    out_A: Tensor


@dataclass
class MergedModule:
    """The merged update of one module as factors (ΔW = lora_B @ lora_A, scaling 1) and its quality report.

    `compression` is (‖R‖², ‖ΔW − R‖²) with R the same rule's uncompressed merge (no truncation, no shared
    rank-r subspace; λ included), from which the report's compression error comes; None where the method
    does not state it. `grams` lets the report be computed from small matrices; the engine drops it after
    the report.
    """

    lora_A: Tensor  # (k, n)
    lora_B: Tensor  # (m, k)
    report: dict[str, Any] = field(default_factory=dict)
    compression: tuple[float, float] | None = None
    grams: ModuleGrams | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


@dataclass(frozen=True)
class RankTarget:
    """The output rank asked for one module: `rank` (explicit, or the default max input rank) or `energy`.

    `choose` turns the singular values of the merged update into a rank k: the smallest k keeping `energy`
    of Σσ² when an energy threshold is set, else min(rank, numerical rank); always k ≥ 1.
    """

    rank: int
    energy: float | None = None

    def choose(self, singular_values: Tensor) -> int:
        s = singular_values.double()
        if s.numel() == 0 or float(s[0]) <= 0.0:
            return 1
        numerical = int((s > float(s[0]) * RANK_TOL).sum())
        if self.energy is not None:
            energy = s.square().cumsum(0)
            energy = energy / energy[-1]
            k = int((energy < self.energy - 1e-12).sum()) + 1
            return max(1, min(k, numerical))
        return max(1, min(self.rank, numerical))


@dataclass
class MergeJob:
    """Everything a registered merge function receives besides its params model.

    `modules[name][t]` is task t's factors for that module (None where the adapter lacks it; at least one
    task is present per module, all present tasks share (m, n)); `targets[name]` is its output rank.
    Methods read the data through `factors(name)`: when the job streams from files, `modules` holds
    shape-only tensors (device "meta") and `loader` reads a module's factors on each call, so a method
    that loads a batch of modules, merges it and lets it go keeps one batch of inputs in memory.
    """

    modules: dict[str, list[TaskFactors | None]]
    targets: dict[str, RankTarget]
    num_tasks: int
    progress: Callable[[float, str], None] = field(default=lambda fraction, stage: None)
    loader: Callable[[str], list[TaskFactors | None]] | None = None
    # a calibrated method's inputs besides the factors (rain: the base model and calibration rows), and the
    # section it adds to the report under its own name
    calibration: Any = None
    notes: dict[str, Any] = field(default_factory=dict)

    def factors(self, name: str) -> list[TaskFactors | None]:
        """Module `name`'s factors with their data (read afresh from the files when streaming)."""
        return self.loader(name) if self.loader is not None else self.modules[name]


@dataclass
class MergeResult:
    """The merged adapter: per-module factors, and the data-free quality report (summary + per module)."""

    modules: dict[str, MergedModule]
    report: dict[str, Any]


def finite(tensor: Tensor) -> bool:
    """True when every entry is finite: one reduction first (a finite sum means finite entries), the exact
    elementwise check only when the sum is not finite (NaN/Inf, or a sum that overflowed)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
