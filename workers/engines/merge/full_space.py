"""Full space: the dense reference. Forms each ΔW_t (m×n), merges entrywise, truncates with a dense SVD.

This is the only merge path (with KnOTS) that builds m×n matrices; it exists as the reference the core
space is checked against, and for rules whose full-space result users ask for by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.engines.merge.rules import RuleOptions, apply_rule
from workers.engines.merge.types import MergedModule, RankTarget, TaskFactors


def merge_full(
    name: str,
    tasks: Sequence[TaskFactors | None],
    rule: str,
    options: RuleOptions,
    lambda_: float,
    target: RankTarget,
) -> MergedModule:
    """Merge one module in full space with `rule`, scale by λ, keep the best rank-k approximation."""
    present = [(t, f) for t, f in enumerate(tasks) if f is not None]
    # dense task updates ΔW_t = B_t A_t
    dense = torch.stack([f.lora_B @ f.lora_A for _, f in present])
    m, n = dense.shape[1:]
    # merge entrywise with the rule, then λ
    outcome = apply_rule(rule, dense.reshape(1, len(present), m * n), options, [name])
    merged = lambda_ * outcome.merged.reshape(m, n).double()
    # exact rank-k truncation (Eckart–Young) of the dense merge
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    k = target.choose(s)
    root = s[:k].sqrt()
    conflicts: list[float | None] = [None] * len(tasks)
    for j, (t, _) in enumerate(present):
        conflicts[t] = float(outcome.conflicts()[0, j])
    return MergedModule(
        lora_A=(root.unsqueeze(-1) * vh[:k]).to(dense.dtype),
        lora_B=(u[:, :k] * root).to(dense.dtype),
        sign_conflict=conflicts,
    )
