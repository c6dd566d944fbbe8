"""`ties` — TIES-Merging (Yadav et al., NeurIPS 2023): trim to top-density per task, elect sign, disjoint mean.

In `core` space (default) the rule is applied to the K×K core-space cores; in `full` space to the dense
updates (the reference). Either way the result is truncated exactly to the module's output rank. This is
`merge_then_compress` with the rule fixed to `ties`.
"""

from __future__ import annotations

from app.schemas.merge import TiesParams
from workers.engines.merge.merge_then_compress import merge_in_space
from workers.engines.merge.rules import RuleOptions
from workers.engines.merge.types import MergedModule, MergeJob
from workers.engines.registry import register


@register("merge", "ties", TiesParams)
def ties(job: MergeJob, params: TiesParams) -> dict[str, MergedModule]:
    """Merge every module with the `ties` rule in `params.space`, then truncate to the output rank."""
    return merge_in_space(job, "ties", RuleOptions.from_params(params), params.lambda_, params.space)
