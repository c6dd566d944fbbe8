"""`breadcrumbs` — Model Breadcrumbs (Davari & Belilovsky, ECCV 2024).

Drop the largest `gamma` and the smallest entries per task, keeping `density`, then sum.

In `core` space (default) the rule is applied to the K×K core-space cores; in `full` space to the dense
updates (the reference). Either way the result is truncated exactly to the module's output rank. This is
`merge_then_compress` with the rule fixed to `breadcrumbs`.
"""

from __future__ import annotations

from app.schemas.merge import BreadcrumbsParams
from workers.engines.merge.merge_then_compress import merge_in_space
from workers.engines.merge.rules import RuleOptions
from workers.engines.merge.types import MergedModule, MergeJob
from workers.engines.registry import register


@register("merge", "breadcrumbs", BreadcrumbsParams)
def breadcrumbs(job: MergeJob, params: BreadcrumbsParams) -> dict[str, MergedModule]:
    """Merge every module with the `breadcrumbs` rule in `params.space`, then truncate to the output rank."""
    return merge_in_space(job, "breadcrumbs", RuleOptions.from_params(params), params.lambda_, params.space)
