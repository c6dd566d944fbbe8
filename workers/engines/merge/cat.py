"""`cat` — exact concatenation (PEFT's `combination_type="cat"`): B = λ·[B_1 … B_T], A = [A_1; …; A_T].

The merged update is exactly λ·Σ_t ΔW_t at rank Σ r_t; the requested output rank is ignored.
"""

from __future__ import annotations

import torch

from app.schemas.merge import CatParams
from workers.engines.merge.core_space import gram, stack_factors
from workers.engines.merge.types import MergedModule, MergeJob, ModuleGrams
from workers.engines.registry import register


@register("merge", "cat", CatParams)
def cat(job: MergeJob, params: CatParams) -> dict[str, MergedModule]:
    """Stack every module's factors; λ goes on lora_B. Output rank Σ r_t (only the present tasks)."""
    out: dict[str, MergedModule] = {}
    lam = params.lambda_
    for name in job.modules:
        stack = stack_factors(name, job.factors(name))
        # stack the factors: exact, rank Σr
        gram_B = gram(stack.lora_B, False, torch.float32).double()
        gram_A = gram(stack.lora_A, True, torch.float32).double()
        out_sq = lam * lam * float((gram_B * gram_A).sum())
        out[name] = MergedModule(
            compression=(out_sq, 0.0),  # exact: the output is the uncompressed sum
            lora_A=stack.lora_A,
            lora_B=stack.lora_B if lam == 1.0 else stack.lora_B * lam,
            grams=ModuleGrams(
                gram_B=gram_B,
                gram_A=gram_A,
                cross_B=lam * gram_B,
                cross_A=gram_A,
                out_B=lam * lam * gram_B,
                out_A=gram_A,
            ),
        )
        job.progress(len(out) / max(1, len(job.modules)), "concatenating")
    return out
