"""`cast`: the factors down-cast to bf16 or fp16, with the error that costs stated.

Rounding to nearest: each entry changes by at most the format's unit roundoff u (2⁻⁸ for bf16, 2⁻¹¹ for
fp16), so ‖ΔW − ΔW'‖_F ≤ (2u + u²)·s·‖B‖_F·‖A‖_F. The adapter's ranks and scaling are kept (its config is
unchanged); values past float16's range (65504) are refused rather than stored as Inf.
"""

from __future__ import annotations

import torch

from app.schemas.compress import CastParams
from workers.engines.compress.errors import CompressNumericError
from workers.engines.compress.report import difference_norms, module_row, totals
from workers.engines.compress.types import CompressedModule, CompressJob, CompressResult, finite
from workers.engines.registry import register

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@register("compress", "cast", CastParams)
def cast(job: CompressJob, params: CastParams) -> CompressResult:
    """Every module's factors in `params.dtype`; per-module and total relative errors."""
    dtype = DTYPES[params.dtype]
    out: dict[str, CompressedModule] = {}
    rows = {}
    for name, module in job.modules.items():
        lora_A, lora_B = module.lora_A.to(dtype), module.lora_B.to(dtype)
        if not (finite(lora_A) and finite(lora_B)):
            raise CompressNumericError(f"module {name!r}: its values overflow {params.dtype} (use bf16)")
        norm2, diff2 = difference_norms(*module.delta_factors(), lora_B.float() * module.scaling, lora_A.float())
        m, n = module.shape
        params_count = module.rank * (m + n)
        rows[name] = module_row(
            shape=module.shape,
            rank_in=module.rank,
            rank_out=module.rank,
            params_in=params_count,
            params_out=params_count,
            bytes_in=params_count * module.lora_A.element_size(),
            bytes_out=params_count * lora_A.element_size(),
            norm2=norm2,
            diff2=diff2,
        )
        out[name] = CompressedModule(lora_A=lora_A, lora_B=lora_B, scaling=module.scaling, report=rows[name])
        job.progress(len(out) / max(1, len(job.modules)), f"cast to {params.dtype}")
    summary = totals(rows.values())
    return CompressResult(
        modules=out, report={"summary": summary, "dtype": params.dtype, "modules": rows}, config="keep"
    )
