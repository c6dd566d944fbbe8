"""What a compression method takes and returns, per module, in PEFT's words."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from app.checks.peft_patterns import PeftPattern


@dataclass(frozen=True)
class AdapterModule:
    """One LoRA module as stored: its factors in their stored dtype and its PEFT scaling (alpha/r, alpha/√r
    with rsLoRA, patterns resolved), so ΔW = scaling · lora_B @ lora_A."""

    lora_A: Tensor  # (r, n)
    lora_B: Tensor  # (m, r)
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])

    def delta_factors(self) -> tuple[Tensor, Tensor]:
        """(scaling·lora_B, lora_A) in float32: ΔW = B @ A with the scaling folded in once."""
        return self.lora_B.float() * self.scaling, self.lora_A.float()


@dataclass(frozen=True)
class SizeRule:
    """The output's size: at most one of a rank for every module, a PEFT rank pattern (modules it does not
    match keep their rank), an energy fraction per module, or a parameter budget for the whole adapter."""

    rank: int | None = None
    pattern: PeftPattern[int] | None = None
    energy: float | None = None
    budget_params: int | None = None


@dataclass
class CompressedModule:
    """One output module as it is written: ΔW' = scaling · lora_B @ lora_A (scaling 1 when the method folds
    it, the input's when it keeps the adapter's config), plus its report row. `stored` holds what a compact
    output writes instead of dense factors (sparsify_quantize)."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    report: dict[str, Any]
    stored: dict[str, Any] | None = None

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


ConfigRule = Literal["keep", "folded"]


@dataclass
class CompressResult:
    """The output modules (a module of rank 0 is dropped and listed in `dropped`), the report (summary
    totals, per-module rows, method details) and how the output's adapter_config follows: `keep` (the input's
    ranks and scaling) or `folded` (scaling 1: r = lora_alpha = each module's rank)."""

    modules: dict[str, CompressedModule]
    report: dict[str, Any]
    config: ConfigRule
    dropped: list[str] = field(default_factory=list)


def _no_progress(fraction: float, stage: str) -> None:
    return None


@dataclass
class CompressJob:
    """An adapter method's inputs: every module as stored, the output's size rule, a progress callback."""

    modules: Mapping[str, AdapterModule]
    size: SizeRule = field(default_factory=SizeRule)
    progress: Callable[[float, str], None] = _no_progress


@dataclass(frozen=True)
class WeightDelta:
    """One module's W_ft − W_base in float32, (out, in) orientation (the engine may overwrite it), and
    ‖W_base‖_F (for the skip threshold)."""

    delta: Tensor
    base_norm: float


@dataclass
class ExtractJob:
    """`extract`'s inputs: each target module's (m, n) in LoRA orientation and its stored dtype, a loader
    that reads one module's difference afresh from the two models' files (one module in memory) onto
    `device`, and that device (where the random sketch is drawn)."""

    modules: Mapping[str, tuple[int, int, torch.dtype]]
    delta: Callable[[str], WeightDelta]
    size: SizeRule = field(default_factory=SizeRule)
    progress: Callable[[float, str], None] = _no_progress
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
