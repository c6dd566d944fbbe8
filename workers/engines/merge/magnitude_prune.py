"""`magnitude_prune` — Magnitude pruning: keep the top-density entries by magnitude per task, then sum.

In `core` space (default) the rule is applied to the K×K core-space cores; in `full` space to the dense
updates (the reference). Either way the result is truncated exactly to the module's output rank. This is
`merge_then_compress` with the rule fixed to `magnitude_prune`.
"""

from __future__ import annotations

from app.schemas.merge import MagnitudePruneParams
from workers.engines.merge.merge_then_compress import merge_in_space
from workers.engines.merge.rules import RuleOptions
from workers.engines.merge.types import MergedModule, MergeJob
from workers.engines.registry import register


@register("merge", "magnitude_prune", MagnitudePruneParams)
def magnitude_prune(job: MergeJob, params: MagnitudePruneParams) -> dict[str, MergedModule]:
    """Merge every module with the `magnitude_prune` rule in `params.space`, then truncate to the output rank."""
    return merge_in_space(job, "magnitude_prune", RuleOptions.from_params(params), params.lambda_, params.space)
