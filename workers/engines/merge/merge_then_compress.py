"""`merge_then_compress` (MtC): merge with any rule in `full` or `core` space, then the exact rank-r truncation.

The baseline of CtM (He et al., ICML 2026, `merge_space in {full, core}` followed by a truncated SVD) and
the core-space merge of Panariello, Marczak et al. (NeurIPS 2025). In core space the rule is applied to the
K×K cores M_t, and the truncation is the SVD of the merged K×K core — the exact Eckart–Young truncation
of the merged update, never an m×n SVD. `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`,
`magnitude_prune` and `breadcrumbs` are this function with the rule fixed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.schemas.merge import MergeThenCompressParams
from workers.engines.merge.core_space import (
    CoreBasis,
    batches,
    core_bases,
    cores,
    lift,
    lifted_grams,
    stack_factors,
    task_cores,
    truncate,
)
from workers.engines.merge.full_space import merge_full
from workers.engines.merge.rules import RuleOptions, apply_rule, is_sum
from workers.engines.merge.sparsify import elect_sign, sign_conflicts
from workers.engines.merge.types import MergedModule, MergeJob
from workers.engines.registry import register


def merge_in_space(
    job: MergeJob, rule: str, options: RuleOptions, lambda_: float, space: str
) -> dict[str, MergedModule]:
    """Merge every module of `job` with `rule` in `space` (`full` | `core`), scale by λ, truncate to rank."""
    out: dict[str, MergedModule] = {}
    total = max(1, len(job.modules))
    if space == "full":
        for name in job.modules:
            out[name] = merge_full(name, job.factors(name), rule, options, lambda_, job.targets[name])
            job.progress(len(out) / total, "merging (full space)")
        return out
    for batch in batches(job.modules):
        stacks = [stack_factors(name, job.factors(name)) for name in batch]
        # core bases and per-task cores M_t (lossless)
        basis = core_bases(stacks, singular=rule != "task_arithmetic")
        g, d_B, d_A = basis.coords_B.shape[0], basis.coords_B.shape[1], basis.coords_A.shape[2]
        # merge the cores with the rule, then λ
        if is_sum(rule):  # Σ_t M_t is the product of the stacked coordinates; signs only for the report
            summed = basis.coords_B @ basis.coords_A
            merged = lambda_ * summed
            conflicts = _sum_conflicts(basis, stacks[0].slices, summed)
        else:
            m_t = cores(basis, stacks[0].ranks)
            outcome = apply_rule(rule, m_t.reshape(g, len(stacks[0].ranks), d_B * d_A), options, batch)
            merged = lambda_ * outcome.merged.reshape(g, d_B, d_A)
            conflicts = outcome.conflicts()
        # exact rank-r truncation on the K×K core
        parts = truncate(merged, [job.targets[name] for name in batch])
        for i, (stack, (left, right)) in enumerate(zip(stacks, parts, strict=True)):
            lora_B, lora_A = lift(stack, basis, i, left, right)
            per_task: list[float | None] = [None] * job.num_tasks
            for j, task in enumerate(stack.tasks):
                per_task[task] = float(conflicts[i, j])
            out[stack.name] = MergedModule(
                lora_A=lora_A, lora_B=lora_B, sign_conflict=per_task, grams=lifted_grams(basis, i, left, right)
            )
        job.progress(len(out) / total, "merging (core space)")
        del stacks, basis  # before the next batch is loaded, so its buffers reuse this batch's memory
    return out


def _sum_conflicts(basis: CoreBasis, spans: list[slice], summed: Tensor) -> Tensor:
    """Sign-conflict rate per (module, task) of a plain sum, whose elected sign is the sign of the summed
    cores: one task's cores at a time, so the (G, T, K, K) stack of all cores is never formed."""
    g = summed.shape[0]
    sign = elect_sign(summed.reshape(g, 1, -1))
    return torch.cat([sign_conflicts(task_cores(basis, span).reshape(g, 1, -1), sign) for span in spans], dim=1)


@register("merge", "merge_then_compress", MergeThenCompressParams)
def merge_then_compress(job: MergeJob, params: MergeThenCompressParams) -> dict[str, MergedModule]:
    """Rule `params.rule` in `params.space`, then the exact truncation to each module's output rank."""
    return merge_in_space(job, params.rule, RuleOptions.from_params(params), params.lambda_, params.space)
