"""Compression methods: one adapter (or a full fine-tune's difference) → a smaller adapter. Importing this
package registers every method.

One module per method, named after it: `rank_reduce` (exact truncated SVD from the factors, to a rank,
pattern, energy or budget), `cast` (bf16 / fp16), `sparsify_quantize` (ComPEFT-style), `extract` (a LoRA
from two models' weight difference, randomized range finder). Shared pieces beside them: `types` (what a
method takes and returns), `lowrank` (the SVD of B·A from the factors), `allocation` (ranks from a size
rule, the exact budget allocation), `report` (errors and sizes per module and in total), `errors`.
"""

from workers.engines.compress import (  # noqa: F401  (imported to register the methods)
    cast,
    extract,
    rank_reduce,
    sparsify_quantize,
)
