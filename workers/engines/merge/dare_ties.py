"""`dare_ties` — DARE-TIES (Yu et al., ICML 2024): DARE pruning, then TIES sign election and disjoint mean.

In `core` space (default) the rule is applied to the K×K core-space cores; in `full` space to the dense
updates (the reference). Either way the result is truncated exactly to the module's output rank. This is
`merge_then_compress` with the rule fixed to `dare_ties`.
"""

from __future__ import annotations

from app.schemas.merge import DareTiesParams
from workers.engines.merge.merge_then_compress import merge_in_space
from workers.engines.merge.rules import RuleOptions
from workers.engines.merge.types import MergedModule, MergeJob
from workers.engines.registry import register


@register("merge", "dare_ties", DareTiesParams)
def dare_ties(job: MergeJob, params: DareTiesParams) -> dict[str, MergedModule]:
    """Merge every module with the `dare_ties` rule in `params.space`, then truncate to the output rank."""
    return merge_in_space(job, "dare_ties", RuleOptions.from_params(params), params.lambda_, params.space)
