"""Merge methods: T LoRA adapters → one adapter. Importing this package registers every method.

One module per method with logic of its own (named after it): `cat`, `merge_then_compress`, `knots`, `ctm`,
`rain` (calibrated: it reads a base model and calibration rows, `MergeJob.calibration`).
Methods that differ only in configuration are registered beside the implementation they configure:
`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` and `breadcrumbs` are rows of
`merge_then_compress.VARIANTS` (the rule fixed), each with its paper. Shared pieces beside them:
`core_space` (bases and cores), `sparsify` (pruning and sign rules), `rules` (the rule table and dispatch),
`full_space` (the dense reference), `report` (data-free quality report) and `engine` (the entry point,
`merge_modules`).
"""

from workers.engines.merge import (  # noqa: F401  (imported to register the methods)
    cat,
    ctm,
    knots,
    merge_then_compress,
    rain,
)
