"""`merge_then_compress` (MtC): merge with any rule in `full` or `core` space, then the exact rank-r truncation.

The baseline of CtM (He et al., ICML 2026, `merge_space in {full, core}` followed by a truncated SVD) and
the core-space merge of Panariello, Marczak et al. (NeurIPS 2025). In core space the rule is applied to the
K×K cores M_t, and the truncation is the SVD of the merged K×K core — the exact Eckart–Young truncation
of the merged update, never an m×n SVD.

`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`, `breadcrumbs`, `tsv`, `iso_c` and
`iso_cts` are this implementation with the rule fixed: each is one row of `VARIANTS` below (its params model
and its paper), registered under its own name; what the rule does (sparsifier, sign election, or a spectral
function of whole matrices) is its row in `rules.RULES`.

A spectral rule (`spectral.py`) sets its own output rank: the module's target (`RankTarget.choose`) on the
spectrum of the plain sum Σ_tM_t; its result already has at most that rank, so the truncation keeps it
whole. `isotropize` (every rule, both spaces) replaces the kept singular values by their mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.schemas.merge import (
    BreadcrumbsParams,
    DareLinearParams,
    DareTiesParams,
    IsoCParams,
    IsoCtsParams,
    MagnitudePruneParams,
    MergeThenCompressParams,
    TaskArithmeticParams,
    TiesParams,
    TsvParams,
)
from workers.engines import linalg_pool
from workers.engines.merge.core_space import (
    batches,
    core_bases,
    cores,
    factored_cores,
    merged_modules,
    stack_factors,
    truncate,
)
from workers.engines.merge.core_space import isotropic as isotropic_core
from workers.engines.merge.full_space import merge_full
from workers.engines.merge.rules import RuleOptions, apply_rule, is_spectral, is_sum, merge_matrices_at
from workers.engines.merge.types import MergedModule, MergeJob, RankTarget
from workers.engines.registry import register


def merge_in_space(
    job: MergeJob, rule: str, options: RuleOptions, lambda_: float, space: str, isotropic: bool = False
) -> dict[str, MergedModule]:
    """Merge every module of `job` with `rule` in `space` (`full` | `core`), scale by λ, truncate to rank
    (isotropically when `isotropic`)."""
    out: dict[str, MergedModule] = {}
    total = max(1, len(job.modules))
    if space == "full":
        for name in job.modules:
            out[name] = merge_full(
                name, job.factors(name), rule, options, lambda_, job.targets[name], isotropic=isotropic
            )
            job.progress(len(out) / total, "merging (full space)")
        return out
    return _merge_in_core(job, rule, options, lambda_, isotropic)


@linalg_pool.pool_only()  # the K×K work of many modules: parallel on the pool, one OpenMP thread each
def _merge_in_core(
    job: MergeJob, rule: str, options: RuleOptions, lambda_: float, isotropic: bool
) -> dict[str, MergedModule]:
    out: dict[str, MergedModule] = {}
    total = max(1, len(job.modules))
    spectral = is_spectral(rule)
    for batch in batches(job.modules):
        stacks = [stack_factors(name, job.factors(name)) for name in batch]
        # core bases and per-task cores M_t (lossless); entrywise rules need the singular bases
        basis = core_bases(stacks, singular=not (is_sum(rule) or spectral))
        g, d_B, d_A = basis.coords_B.shape[0], basis.coords_B.shape[1], basis.coords_A.shape[2]
        targets = [job.targets[name] for name in batch]
        # merge the cores with the rule, then λ
        if is_sum(rule):  # Σ_t M_t is the product of the stacked coordinates
            merged = lambda_ * (basis.coords_B @ basis.coords_A)
            uncompressed = merged
        elif spectral:  # whole-matrix rule on the cores, to the rank the target picks on the sum's spectrum
            sums = linalg_pool.svd(basis.coords_B @ basis.coords_A)  # the sum's SVD, also Iso-C's and Iso-CTS'
            ranks = [target.choose(sums[1][i]) for i, target in enumerate(targets)]
            task_cores = factored_cores(basis.coords_B, basis.coords_A, list(stacks[0].ranks))
            # and uncompressed: the rule at the full core rank (the core-space code's result)
            merged, uncompressed = (
                lambda_ * m
                for m in merge_matrices_at(rule, task_cores, options, batch, [ranks, [max(d_B, d_A)] * g], sums)
            )
            targets = [RankTarget(rank=r) for r in ranks]
        else:
            m_t = cores(basis, stacks[0].ranks)
            outcome = apply_rule(rule, m_t.reshape(g, len(stacks[0].ranks), d_B * d_A), options, batch)
            merged = lambda_ * outcome.merged.reshape(g, d_B, d_A)
            uncompressed = merged
        if isotropic:
            uncompressed = isotropic_core(uncompressed)
        # exact rank-r truncation on the K×K core
        out.update(merged_modules(stacks, basis, truncate(merged, targets, isotropic=isotropic), uncompressed))
        job.progress(len(out) / total, "merging (core space)")
        del stacks, basis  # before the next batch is loaded, so its buffers reuse this batch's memory
    return out


@register("merge", "merge_then_compress", MergeThenCompressParams)
def merge_then_compress(job: MergeJob, params: MergeThenCompressParams) -> dict[str, MergedModule]:
    """Rule `params.rule` in `params.space`, then the exact truncation to each module's output rank."""
    options = RuleOptions.from_params(params)
    return merge_in_space(job, params.rule, options, params.lambda_, params.space, params.isotropize)


VariantParams = (
    TaskArithmeticParams
    | TiesParams
    | DareLinearParams
    | DareTiesParams
    | MagnitudePruneParams
    | BreadcrumbsParams
    | TsvParams
    | IsoCParams
    | IsoCtsParams
)


@dataclass(frozen=True)
class Variant:
    """A method that is `merge_then_compress` with the rule fixed to the method's name."""

    params_model: type[VariantParams]
    paper: str


VARIANTS: dict[str, Variant] = {
    "task_arithmetic": Variant(
        TaskArithmeticParams,
        "Task arithmetic (Ilharco et al., ICLR 2023): λ·Σ_t ΔW_t exactly (not PEFT's factor-wise `linear` "
        "with its cross terms), then the exact rank-r truncation.",
    ),
    "ties": Variant(
        TiesParams,
        "TIES-Merging (Yadav et al., NeurIPS 2023): trim to top-density per task, elect sign, disjoint mean.",
    ),
    "dare_linear": Variant(
        DareLinearParams,
        "DARE (Yu et al., ICML 2024): keep each entry with probability density, rescale by 1/density, sum.",
    ),
    "dare_ties": Variant(
        DareTiesParams,
        "DARE-TIES (Yu et al., ICML 2024): DARE pruning, then TIES sign election and disjoint mean.",
    ),
    "magnitude_prune": Variant(
        MagnitudePruneParams,
        "Magnitude pruning: keep the top-density entries by magnitude per task, then sum.",
    ),
    "breadcrumbs": Variant(
        BreadcrumbsParams,
        "Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop the largest `gamma` and the smallest "
        "entries per task, keeping `density`, then sum.",
    ),
    "tsv": Variant(
        TsvParams,
        "Task Singular Vectors (Gargiulo et al., CVPR 2025): each task's top ⌊rank/T⌋ singular triplets, "
        "U and V orthogonalised by their polar factors (see `spectral.py`).",
    ),
    "iso_c": Variant(
        IsoCParams,
        "Iso-C (Marczak et al., ICML 2025): the sum's top-rank singular directions, singular values replaced "
        "by their mean (see `spectral.py`).",
    ),
    "iso_cts": Variant(
        IsoCtsParams,
        "Iso-CTS (Marczak et al., ICML 2025): common directions of the sum and each task's own directions, "
        "orthogonalised together, isotropic (see `spectral.py`).",
    ),
}


def _with_rule(rule: str, variant: Variant) -> Callable[[MergeJob, VariantParams], dict[str, MergedModule]]:
    def merge(job: MergeJob, params: VariantParams) -> dict[str, MergedModule]:
        options = RuleOptions.from_params(params)
        return merge_in_space(job, rule, options, params.lambda_, params.space, params.isotropize)

    merge.__name__ = merge.__qualname__ = rule
    merge.__doc__ = (
        f"`{rule}` — {variant.paper}\n\nMerge every module with the `{rule}` rule in `params.space` (`core`, the "
        "default: the K×K core-space cores; `full`: the dense updates, the reference), then truncate exactly "
        "to the module's output rank."
    )
    return merge


for _name, _variant in VARIANTS.items():
    register("merge", _name, _variant.params_model)(_with_rule(_name, _variant))
