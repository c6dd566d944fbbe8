"""Merge methods: T LoRA adapters → one adapter. Importing this package registers every method.

One module per method (named after it), shared pieces beside them: `core_space` (bases and cores),
`sparsify` (pruning and sign rules), `rules` (rule dispatch), `full_space` (the dense reference),
`report` (data-free quality report) and `engine` (the entry point, `merge_modules`).
"""

from workers.engines.merge import (  # noqa: F401  (imported to register the methods)
    breadcrumbs,
    cat,
    ctm,
    dare_linear,
    dare_ties,
    knots,
    magnitude_prune,
    merge_then_compress,
    task_arithmetic,
    ties,
)
