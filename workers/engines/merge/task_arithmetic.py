"""`task_arithmetic` — Task arithmetic (Ilharco et al., ICLR 2023).

λ·Σ_t ΔW_t exactly (not PEFT's factor-wise `linear` with its cross terms), then the exact rank-r truncation.

In `core` space (default) the rule is applied to the K×K core-space cores; in `full` space to the dense
updates (the reference). Either way the result is truncated exactly to the module's output rank. This is
`merge_then_compress` with the rule fixed to `task_arithmetic`.
"""

from __future__ import annotations

from app.schemas.merge import TaskArithmeticParams
from workers.engines.merge.merge_then_compress import merge_in_space
from workers.engines.merge.rules import RuleOptions
from workers.engines.merge.types import MergedModule, MergeJob
from workers.engines.registry import register


@register("merge", "task_arithmetic", TaskArithmeticParams)
def task_arithmetic(job: MergeJob, params: TaskArithmeticParams) -> dict[str, MergedModule]:
    """Merge every module with the `task_arithmetic` rule in `params.space`, then truncate to the output rank."""
    return merge_in_space(job, "task_arithmetic", RuleOptions.from_params(params), params.lambda_, params.space)
