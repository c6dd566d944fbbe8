"""`extract`: a LoRA adapter from a base model and its full fine-tune, module by module.

Halko, Martinsson & Tropp, "Finding structure with randomness" (SIAM Review, 2011), Algorithm 4.4
(randomized subspace iteration): for D = W_ft − W_base (m×n) and a sketch of l = k + oversample columns,
Q = orth(D·Ω) with Ω Gaussian n×l, then `power_iterations` times Q = orth(D·orth(Dᵀ·Q)); the SVD of the
small l×n matrix Qᵀ·D gives D's leading singular triplets. Cost: 2 + 2q products of D with an n×l or m×l
matrix, against a full SVD of D — a 4096×11008 module needs no full SVD. Small modules (min(m, n) ≤ 2l) take
the exact SVD directly.

Ranks: `rank` (16 when no rule is given; at most min(m, n)), a PEFT `rank_pattern`, or `energy` — the
smallest k keeping that fraction of ‖D‖²_F, the sketch doubling until it holds that much (up to `max_rank`).
Directions with σ ≤ 1e-6·σ_max are float noise and dropped. Modules whose change is at most
`min_relative_change`·‖W_base‖ are skipped and listed. The stated error is the residual's own norm,
‖D − B·A‖_F / ‖D‖_F, computed with the factors as stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from app.schemas.compress import ExtractParams
from workers.engines.compress.errors import CompressNumericError
from workers.engines.compress.lowrank import numerical_rank
from workers.engines.compress.report import module_row, totals
from workers.engines.compress.types import CompressedModule, CompressResult, ExtractJob, SizeRule, finite
from workers.engines.registry import register


def _orth(x: Tensor) -> Tensor:
    return torch.linalg.qr(x).Q


def range_finder_svd(
    delta: Tensor, sketch: int, power_iterations: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) of the leading `sketch` singular triplets of `delta` (randomized subspace iteration); the
    exact thin SVD when `delta` is small next to the sketch."""
    m, n = delta.shape
    if min(m, n) <= 2 * sketch:
        return torch.linalg.svd(delta, full_matrices=False)
    omega = torch.randn(n, sketch, generator=generator, dtype=delta.dtype, device=delta.device)
    q = _orth(delta @ omega)
    for _ in range(power_iterations):
        q = _orth(delta @ _orth(delta.mT @ q))
    u, s, vh = torch.linalg.svd(q.mT @ delta, full_matrices=False)
    return q @ u, s, vh


DEFAULT_RANK = 16


def _target_rank(name: str, shape: tuple[int, int], size: SizeRule) -> int | None:
    """The rank asked for this module (16 when the output sets no rule), or None for an energy target."""
    if size.energy is not None:
        return None
    rank = size.rank or DEFAULT_RANK
    if size.pattern is not None:
        rank = int(size.pattern.value(name, rank))
    return min(rank, min(shape))


def extract_module(
    name: str, delta: Tensor, size: SizeRule, params: ExtractParams, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(lora_B, lora_A) of one module's difference in float32, balanced (√σ on both sides)."""
    full = min(int(delta.shape[0]), int(delta.shape[1]))
    wanted = _target_rank(name, (int(delta.shape[0]), int(delta.shape[1])), size)
    if wanted is not None:
        u, s, vh = range_finder_svd(delta, min(wanted + params.oversample, full), params.power_iterations, generator)
        k = wanted
    else:  # energy: grow the sketch until its leading directions hold the fraction of ‖D‖² asked for
        energy, cap = float(size.energy or 1.0), min(params.max_rank, full)
        total = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        sketch = min(min(32, cap) + params.oversample, full)
        while True:
            u, s, vh = range_finder_svd(delta, sketch, params.power_iterations, generator)
            kept = s.double()[:cap].square().cumsum(0) / (total or 1.0)
            largest = min(full, cap + params.oversample)
            if float(kept[-1]) >= energy - 1e-12 or sketch >= largest:
                break
            sketch = min(2 * sketch, largest)
        reached = kept >= energy - 1e-12
        k = int(reached.nonzero()[0]) + 1 if bool(reached.any()) else cap
    k = min(k, numerical_rank(s.double()))
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


@register("compress", "extract", ExtractParams)
def extract(job: ExtractJob, params: ExtractParams) -> CompressResult:
    """A LoRA of every target module's W_ft − W_base; modules that barely changed are skipped and listed."""
    generator = torch.Generator(device=job.device).manual_seed(params.seed)  # the sketch is drawn on the device
    out: dict[str, CompressedModule] = {}
    rows, skipped = {}, {}
    for position, (name, (m, n, dtype)) in enumerate(job.modules.items()):
        loaded = job.delta(name)
        delta = loaded.delta
        norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
        if norm <= params.min_relative_change * loaded.base_norm:
            skipped[name] = {"relative_change": norm / loaded.base_norm if loaded.base_norm else 0.0}
            continue
        if not math.isfinite(norm):
            raise CompressNumericError(f"module {name!r}: the weight difference is not finite")
        lora_B, lora_A = extract_module(name, delta, job.size, params, generator)
        stored_B, stored_A = lora_B.to(dtype).contiguous(), lora_A.to(dtype).contiguous()
        if not (finite(stored_B) and finite(stored_A)):
            raise CompressNumericError(f"module {name!r}: the extracted factors are not finite in {dtype}")
        # the residual, in place (the difference is this job's own copy)
        residual = delta.addmm_(stored_B.float(), stored_A.float(), alpha=-1.0)
        diff2 = float(torch.linalg.vector_norm(residual, dtype=torch.float64)) ** 2
        k, width = int(stored_A.shape[0]), stored_A.element_size()
        rows[name] = module_row(
            shape=(m, n),
            rank_in=None,
            rank_out=k,
            params_in=m * n,
            params_out=k * (m + n),
            bytes_in=m * n * width,
            bytes_out=k * (m + n) * width,
            norm2=norm * norm,
            diff2=diff2,
            relative_change=norm / loaded.base_norm if loaded.base_norm else None,
            change_norm=norm,
        )
        out[name] = CompressedModule(lora_A=stored_A, lora_B=stored_B, scaling=1.0, report=rows[name])
        del loaded, delta, residual
        job.progress((position + 1) / max(1, len(job.modules)), "extracting")
    summary = totals(rows.values())
    summary["skipped"] = len(skipped)
    return CompressResult(
        modules=out,
        report={"summary": summary, "modules": rows, "skipped": skipped},
        config="folded",
        dropped=sorted(skipped),
    )
