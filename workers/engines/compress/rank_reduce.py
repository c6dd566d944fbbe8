"""`rank_reduce`: the exact truncated SVD of every module's update, from its factors.

Eckart & Young (1936): the best rank-k approximation of ΔW = s·B·A in Frobenius norm is its SVD truncated to
k. The SVD comes from the factors (`lowrank.factor_svd`: QR of B and Aᵀ, SVD of the r×r core), never from
m×n, so a rank-64 module of 11008×4096 costs two thin QRs instead of a 4096×11008 SVD. Ranks follow the
output's size rule (`allocation`: a rank, a PEFT rank pattern, an energy fraction per module, or a
parameter budget allocated exactly across modules). The scaling (alpha/r, rsLoRA's alpha/√r, patterns) is
folded once: the output's factors are balanced (√σ on both sides) with scaling 1 (lora_alpha = r).
"""

from __future__ import annotations

import torch

from app.schemas.compress import RankReduceParams
from workers.engines.compress.allocation import (
    allocate_budget,
    best_uniform,
    cost_of,
    energy_rank,
    kept_energy,
)
from workers.engines.compress.errors import CompressNumericError
from workers.engines.compress.lowrank import Spectrum, factor_svd
from workers.engines.compress.report import difference_norms, module_row, totals
from workers.engines.compress.types import (
    AdapterModule,
    CompressedModule,
    CompressJob,
    CompressResult,
    SizeRule,
    finite,
)
from workers.engines.registry import register


def choose_ranks(spectra: dict[str, Spectrum], costs: dict[str, int], size: SizeRule) -> tuple[dict[str, int], dict]:
    """Each module's output rank under the size rule (never above its numerical rank), and how it was chosen."""
    gains = {name: spectrum.energies().cpu().numpy() for name, spectrum in spectra.items()}
    if size.budget_params is not None:
        allocation = allocate_budget(gains, costs, size.budget_params)
        uniform = best_uniform(gains, costs, size.budget_params)
        total = sum(float(g.sum()) for g in gains.values()) or 1.0
        return allocation.ranks, {
            "budget_params": size.budget_params,
            "params_used": allocation.cost,
            "allocation": allocation.method,
            "energy_kept": kept_energy(allocation.ranks, gains) / total,
            "uniform_rank": max(uniform.values(), default=0),
            "uniform_params": cost_of(uniform, costs),
            "uniform_energy_kept": kept_energy(uniform, gains) / total,
        }
    if size.energy is not None:
        return {name: energy_rank(g, size.energy) for name, g in gains.items()}, {"energy": size.energy}
    if size.rank is not None:
        return {name: min(size.rank, s.rank) for name, s in spectra.items()}, {"rank": size.rank}
    if size.pattern is not None:
        pattern = size.pattern
        return {name: min(int(pattern.value(name, s.rank)), s.rank) for name, s in spectra.items()}, {
            "rank_pattern": dict(pattern.values)
        }
    return {name: s.rank for name, s in spectra.items()}, {"rank": "numerical"}


def _output(name: str, module: AdapterModule, spectrum: Spectrum, k: int) -> tuple[CompressedModule, dict]:
    """Module `name` truncated to rank k, stored in its input dtype, with its report row."""
    lora_B, lora_A = spectrum.factors(k)
    stored_B, stored_A = lora_B.to(module.lora_B.dtype).contiguous(), lora_A.to(module.lora_A.dtype).contiguous()
    if not (finite(stored_B) and finite(stored_A)):
        raise CompressNumericError(f"module {name!r}: the reduced factors are not finite")
    if stored_A.dtype == torch.float32:  # the truncation's exact error (float32 storage adds ~1e-7 relative)
        norm2, diff2 = float(spectrum.energies().sum()), spectrum.tail(k)
    else:  # the output as stored: its rounding to bf16 / fp16 counts
        norm2, diff2 = difference_norms(*module.delta_factors(), stored_B.float(), stored_A.float())
    cost = module.shape[0] + module.shape[1]
    row = module_row(
        shape=module.shape,
        rank_in=module.rank,
        rank_out=k,
        params_in=module.rank * cost,
        params_out=k * cost,
        bytes_in=module.rank * cost * module.lora_A.element_size(),
        bytes_out=k * cost * stored_A.element_size(),
        norm2=norm2,
        diff2=diff2,
    )
    return CompressedModule(lora_A=stored_A, lora_B=stored_B, scaling=1.0, report=row), row


@register("compress", "rank_reduce", RankReduceParams)
def rank_reduce(job: CompressJob, params: RankReduceParams) -> CompressResult:
    """Every module's exact SVD from its factors, truncated to the rank the size rule gives it.

    A per-module rule (rank, pattern, energy) reduces each module as soon as its SVD is known; a budget needs
    every module's singular values before any rank is chosen (a spectrum holds only r×r matrices beside
    references to the factors, so that costs no m×r copies)."""
    total = max(1, len(job.modules))
    costs = {name: module.shape[0] + module.shape[1] for name, module in job.modules.items()}
    rows: dict[str, dict] = {}
    out: dict[str, CompressedModule] = {}
    ranks: dict[str, int] = {}
    how: dict = {}
    if job.size.budget_params is not None:
        spectra = {}
        for name, module in job.modules.items():
            spectra[name] = factor_svd(module.lora_B, module.lora_A, module.scaling)
            job.progress(0.8 * len(spectra) / total, "factor SVDs")
        ranks, how = choose_ranks(spectra, costs, job.size)
        for name, module in job.modules.items():
            out[name], rows[name] = _output(name, module, spectra.pop(name), ranks[name])
    else:
        for name, module in job.modules.items():
            spectrum = factor_svd(module.lora_B, module.lora_A, module.scaling)
            chosen, how = choose_ranks({name: spectrum}, {name: costs[name]}, job.size)
            ranks[name] = chosen[name]
            out[name], rows[name] = _output(name, module, spectrum, ranks[name])
            job.progress(len(out) / total, "factor SVDs")
    dropped = [name for name, k in ranks.items() if k == 0]
    for name in dropped:
        del out[name]
    job.progress(1.0, "reduced")
    summary = totals(rows.values())
    summary["rank_out_max"] = max(ranks.values(), default=0)
    return CompressResult(
        modules=out,
        report={"summary": summary, "size_rule": how, "modules": rows, "dropped": dropped},
        config="folded",
        dropped=dropped,
    )
