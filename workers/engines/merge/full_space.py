"""Full space: the dense reference. Forms each ΔW_t (m×n), merges entrywise, truncates with a dense SVD.

This is the only merge path (with KnOTS) that builds m×n matrices; it exists as the reference the core
space is checked against, and for rules whose full-space result users ask for by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.engines.merge.core_space import compression
from workers.engines.merge.core_space import isotropic as isotropic_core
from workers.engines.merge.rules import RuleOptions, apply_rule, is_spectral, merge_matrices_at
from workers.engines.merge.types import MergedModule, RankTarget, TaskFactors


def merge_full(
    name: str,
    tasks: Sequence[TaskFactors | None],
    rule: str,
    options: RuleOptions,
    lambda_: float,
    target: RankTarget,
    isotropic: bool = False,
) -> MergedModule:
    """Merge one module in full space with `rule`, scale by λ, keep the best rank-k approximation
    (its singular values replaced by their mean when `isotropic`). A spectral rule gets the output rank
    `target` chooses from the spectrum of the plain sum, as in core space."""
    present = [(t, f) for t, f in enumerate(tasks) if f is not None]
    # dense task updates ΔW_t = B_t A_t
    dense = torch.stack([f.lora_B @ f.lora_A for _, f in present])
    m, n = dense.shape[1:]
    if is_spectral(rule):
        # a spectral rule on the dense matrices (per-task SVDs, as the reference code does)
        stack = dense.double().unsqueeze(0)
        rank = target.choose(torch.linalg.svdvals(stack[0].sum(0)))
        merged, uncompressed = (
            lambda_ * x[0] for x in merge_matrices_at(rule, stack, options, [name], [[rank], [min(m, n)]])
        )
        target = RankTarget(rank=rank)
    else:
        # merge entrywise with the rule, then λ
        outcome = apply_rule(rule, dense.reshape(1, len(present), m * n), options, [name])
        merged = lambda_ * outcome.merged.reshape(m, n).double()
        uncompressed = merged
    # exact rank-k truncation (Eckart–Young) of the dense merge
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    k = target.choose(s)
    kept = s[:k].mean().expand(k) if isotropic else s[:k]
    root = kept.sqrt()
    lora_B, lora_A = u[:, :k] * root, root.unsqueeze(-1) * vh[:k]
    if isotropic:
        uncompressed = isotropic_core(uncompressed)
    return MergedModule(
        lora_A=lora_A.to(dense.dtype),
        lora_B=lora_B.to(dense.dtype),
        compression=compression(lora_B, lora_A, uncompressed),
    )
