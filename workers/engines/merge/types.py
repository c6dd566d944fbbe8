"""What a merge method takes and returns, per module, in PEFT's words."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


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
class MergedModule:
    """The merged update of one module as factors (ΔW = lora_B @ lora_A, scaling 1) and its quality report."""

    lora_A: Tensor  # (k, n)
    lora_B: Tensor  # (m, k)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])
