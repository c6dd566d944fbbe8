"""`dare_linear` — DARE (Yu et al., ICML 2024): keep each entry with probability density, rescale by 1/density, sum.

In `core` space (default) the rule is applied to the K×K core-space cores; in `full` space to the dense
updates (the reference). Either way the result is truncated exactly to the module's output rank. This is
`merge_then_compress` with the rule fixed to `dare_linear`.
"""

from __future__ import annotations

from app.schemas.merge import DareLinearParams
from workers.engines.merge.merge_then_compress import merge_in_space
from workers.engines.merge.rules import RuleOptions
from workers.engines.merge.types import MergedModule, MergeJob
from workers.engines.registry import register


@register("merge", "dare_linear", DareLinearParams)
def dare_linear(job: MergeJob, params: DareLinearParams) -> dict[str, MergedModule]:
    """Merge every module with the `dare_linear` rule in `params.space`, then truncate to the output rank."""
    return merge_in_space(job, "dare_linear", RuleOptions.from_params(params), params.lambda_, params.space)
