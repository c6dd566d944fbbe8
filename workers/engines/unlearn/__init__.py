"""Unlearning engines: one module per method (each supplies only its loss), a shared loop, and the entry
point `unlearn(...)` (see `engine.py`) that the job pipeline calls."""

from workers.engines.unlearn import (  # noqa: F401 - importing registers each method
    finetune,
    flat,
    grad_ascent,
    grad_diff,
    idk,
    l1_sparse,
    mu_mis,
    muso,
    natmu,
    npo,
    random_label,
    retrain,
    rmu,
    salun,
    sfron,
    simnpo,
    ssd,
    ug_clu,
)
from workers.engines.unlearn.data import BatchStream, ClassifierData, LMData, PairedLMData
from workers.engines.unlearn.engine import UnlearnOutcome, unlearn
from workers.engines.unlearn.errors import (
    GoalNotMet,
    MissingInput,
    NonFinite,
    UnlearnCancelled,
    UnlearnError,
    UnsupportedFamily,
)

__all__ = [
    "BatchStream",
    "ClassifierData",
    "GoalNotMet",
    "LMData",
    "MissingInput",
    "NonFinite",
    "PairedLMData",
    "UnlearnCancelled",
    "UnlearnError",
    "UnlearnOutcome",
    "UnsupportedFamily",
    "unlearn",
]
