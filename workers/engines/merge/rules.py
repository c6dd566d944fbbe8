"""Merge rules: a rule name + params applied to T same-shaped tensors. The one place rules are dispatched.

An entrywise rule is a configuration of the shared pieces in `sparsify.py`: an optional sparsifier, then
either a sum (task arithmetic, DARE linear, magnitude prune, breadcrumbs) or TIES' sign election and
disjoint mean (ties, dare_ties); values arrive batched as (G, T, N) and the result is (G, N). A spectral
rule (`spectral.py`: tsv, iso_c, iso_cts) acts on whole matrices: `merge_matrices` takes (G, T, p, q) and
dispatches either kind.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel
from torch import Tensor

from workers.engines import linalg_pool
from workers.engines.merge import spectral
from workers.engines.merge.sparsify import (
    SignMethod,
    Sparsifier,
    disjoint_mean,
    elect_sign,
    sign_conflicts,
    sparsify,
)

SpectralRule = Callable[[spectral.TaskMatrices, int, "RuleOptions"], Tensor]


@dataclass(frozen=True)
class Rule:
    """How a rule treats the task values: which sparsifier, and whether signs are elected (TIES); or, for a
    spectral rule, the function merging one module's task matrices (T, p, q) to a given output rank."""

    sparsifier: Sparsifier | None
    elect: bool
    spectral: SpectralRule | None = None


RULES: dict[str, Rule] = {
    "task_arithmetic": Rule(sparsifier=None, elect=False),
    "ties": Rule(sparsifier="magnitude", elect=True),
    "dare_linear": Rule(sparsifier="random", elect=False),
    "dare_ties": Rule(sparsifier="random", elect=True),
    "magnitude_prune": Rule(sparsifier="magnitude", elect=False),
    "breadcrumbs": Rule(sparsifier="breadcrumbs", elect=False),
    "tsv": Rule(None, False, spectral=lambda mats, rank, options: spectral.tsv(mats, rank)),
    "iso_c": Rule(None, False, spectral=lambda mats, rank, options: spectral.iso_c(mats, rank)),
    "iso_cts": Rule(
        None, False, spectral=lambda mats, rank, options: spectral.iso_cts(mats, rank, options.common_fraction)
    ),
}


@dataclass(frozen=True)
class RuleOptions:
    """Rule parameters: density in [0, 1], gamma in [0, 1 − density], sign election, DARE seed, Iso-CTS'
    common share in [0, 1]."""

    density: float = 1.0
    gamma: float = 0.0
    majority_sign: SignMethod = "total"
    seed: int = 0
    common_fraction: float = 0.8

    @classmethod
    def from_params(cls, params: BaseModel) -> RuleOptions:
        """Read the rule fields a params model has; the others keep their neutral defaults."""
        return cls(
            density=float(getattr(params, "density", 1.0)),
            gamma=float(getattr(params, "gamma", 0.0)),
            majority_sign=getattr(params, "majority_sign", "total"),
            seed=int(getattr(params, "seed", 0)),
            common_fraction=float(getattr(params, "common_fraction", 0.8)),
        )


@dataclass
class RuleOutcome:
    """The merged values (G, N), and the pruned task values and elected sign for the sign-conflict rate."""

    merged: Tensor
    pruned: Tensor
    sign: Tensor

    def conflicts(self) -> Tensor:
        """Sign-conflict rate per (group, task), (G, T)."""
        return sign_conflicts(self.pruned, self.sign)


def generators_for(keys: list[str], seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per group, seeded from the job seed and the group's key (e.g. the module name), so the
    random pruning of a module does not depend on how modules were batched."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(k.encode())) for k in keys]


def is_sum(name: str) -> bool:
    """True for rules that reduce to the plain sum of the task values (no pruning, no sign election), so a
    caller may form the merged value directly (e.g. as a product of stacked factors)."""
    rule = RULES[name]
    return rule.sparsifier is None and not rule.elect and rule.spectral is None


def is_spectral(name: str) -> bool:
    """True for rules that act on whole matrices through their SVDs (their output rank is set by the rule)."""
    return RULES[name].spectral is not None


def merge_matrices(name: str, mats: Tensor, options: RuleOptions, keys: list[str], ranks: list[int]) -> Tensor:
    """Merge task matrices `mats` (G, T, p, q) with rule `name` into (G, p, q): entrywise rules on the
    flattened entries, spectral rules per group to that group's output rank `ranks[g]` (float64)."""
    return merge_matrices_at(name, mats, options, keys, [ranks])[0]


def merge_matrices_at(
    name: str,
    mats: Tensor | tuple[Tensor, Tensor],
    options: RuleOptions,
    keys: list[str],
    rank_lists: list[list[int]],
    sum_svds: tuple[Tensor, Tensor, Tensor] | None = None,
) -> list[Tensor]:
    """`merge_matrices` at several output ranks per group (one merge per list in `rank_lists`): a spectral rule
    decomposes each group's matrices once for all of them; an entrywise rule does not depend on the rank.
    `mats` may be given as low-rank factors (left (G,T,p,ρ), right (G,T,ρ,q)): spectral rules then decompose
    them from the factors (`spectral.TaskMatrices`); entrywise rules multiply them out. `sum_svds`: the batched
    SVD (U, S, Vᴴ) of each group's sum Σ_tM_t, when the caller has it (spectral rules then do not redo it)."""
    rule = RULES[name]
    if rule.spectral is None:
        dense = mats if isinstance(mats, Tensor) else mats[0] @ mats[1]
        g, t, p, q = dense.shape
        merged = apply_rule(name, dense.reshape(g, t, p * q), options, keys).merged.reshape(g, p, q)
        return [merged for _ in rank_lists]
    spectral_rule = rule.spectral
    dtype = mats.dtype if isinstance(mats, Tensor) else mats[0].dtype

    def one(i: int) -> list[Tensor]:  # one group per one-thread pool worker: each is a few K×K SVDs
        known = None if sum_svds is None else (sum_svds[0][i], sum_svds[1][i], sum_svds[2][i])
        if isinstance(mats, Tensor):
            task_matrices = spectral.TaskMatrices(mats[i].double(), sum_svd=known)
        else:
            task_matrices = spectral.TaskMatrices(factors=(mats[0][i].double(), mats[1][i].double()), sum_svd=known)
        return [spectral_rule(task_matrices, ranks[i], options) for ranks in rank_lists]

    groups = len(keys)
    per_group = linalg_pool.map_each(one, range(groups))
    return [torch.stack([group[j] for group in per_group]).to(dtype) for j in range(len(rank_lists))]


def apply_rule(
    name: str, values: Tensor, options: RuleOptions, keys: list[str], keep: Tensor | None = None
) -> RuleOutcome:
    """Merge `values` (G, T, N) with rule `name`; `keys` name the G groups (seeds DARE per group).

    `keep` (G, T, N) bool replaces a magnitude or breadcrumbs rule's own ranking within `values` (KnOTS
    ranks each task's entries across all modules, then merges module by module)."""
    rule = RULES[name]
    # sparsify
    pruned = values
    if keep is not None and rule.sparsifier in ("magnitude", "breadcrumbs"):
        pruned = values * keep
    elif rule.sparsifier is not None:
        generators = generators_for(keys, options.seed, values.device) if rule.sparsifier == "random" else None
        pruned = sparsify(values, rule.sparsifier, options.density, options.gamma, generators)
    # elect sign
    sign = elect_sign(pruned, options.majority_sign if rule.elect else "total")
    # disjoint merge (TIES) or plain sum
    merged = disjoint_mean(pruned, sign) if rule.elect else pruned.sum(dim=1)
    return RuleOutcome(merged=merged, pruned=pruned, sign=sign)
