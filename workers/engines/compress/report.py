"""What every compression job reports (shared pieces): per module and in total, parameters and bytes in and
out, their ratio, the relative Frobenius error ‖ΔW − ΔW'‖_F / ‖ΔW‖_F of the output as stored, and the energy
kept, 1 − error² (for a truncation, Σ_{j≤k} σ_j² / Σ σ_j²).

Errors of factored outputs come from small Gram matrices in float64, never from m×n:
‖BA − B'A'‖² = ‖BA‖² − 2⟨BᵀB', A'Aᵀ⟩ + ⟨B'ᵀB', A'A'ᵀ⟩, with r×k and k×k Grams.
Totals are over all modules together: error = √(Σ differences² / Σ norms²).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor


def difference_norms(ref_B: Tensor, ref_A: Tensor, out_B: Tensor, out_A: Tensor) -> tuple[float, float]:
    """(‖ref_B·ref_A‖²_F, ‖ref_B·ref_A − out_B·out_A‖²_F) in float64 from Gram matrices."""
    b, a = ref_B.double(), ref_A.double()
    norm = float(((b.mT @ b) * (a @ a.mT)).sum())
    if out_A.shape[0] == 0:
        return norm, norm
    b2, a2 = out_B.double(), out_A.double()
    cross = float(((b.mT @ b2) * (a @ a2.mT)).sum())
    own = float(((b2.mT @ b2) * (a2 @ a2.mT)).sum())
    return norm, max(norm - 2.0 * cross + own, 0.0)


def module_row(
    *,
    shape: tuple[int, int],
    rank_in: int | None,
    rank_out: int,
    params_in: int,
    params_out: int,
    bytes_in: int,
    bytes_out: int,
    norm2: float,
    diff2: float,
    **extra: Any,
) -> dict[str, Any]:
    """One module's report row (`norm2`/`diff2` are kept for the totals; `totals` drops them)."""
    error = math.sqrt(diff2 / norm2) if norm2 > 0 else 0.0
    return {
        "shape": list(shape),
        "rank_in": rank_in,
        "rank_out": rank_out,
        "params_in": params_in,
        "params_out": params_out,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "ratio": bytes_in / bytes_out if bytes_out else None,
        "rel_error": error,
        "energy_kept": 1.0 - error * error,
        "norm2": norm2,
        "diff2": diff2,
        **extra,
    }


def totals(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals over all modules: sums, bytes ratio, the error over all modules together, and the largest and
    mean per-module error. Strips the rows' norm2/diff2 working values."""
    rows = list(rows)
    norm2 = sum(row.pop("norm2") for row in rows)
    diff2 = sum(row.pop("diff2") for row in rows)
    error = math.sqrt(diff2 / norm2) if norm2 > 0 else 0.0
    out: dict[str, Any] = {
        key: sum(row[key] for row in rows) for key in ("params_in", "params_out", "bytes_in", "bytes_out")
    }
    errors = [row["rel_error"] for row in rows]
    out.update(
        ratio=out["bytes_in"] / out["bytes_out"] if out["bytes_out"] else None,
        rel_error=error,
        energy_kept=1.0 - error * error,
        max_rel_error=max(errors, default=0.0),
        mean_rel_error=sum(errors) / len(errors) if errors else 0.0,
        modules=len(rows),
    )
    return out
