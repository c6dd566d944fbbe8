"""Output ranks from a size rule (shared pieces): per module by rank, pattern or energy, or a parameter budget
allocated across modules to keep the most energy.

The budget problem: module i has gains g_i1 ≥ g_i2 ≥ … (its σ_j², the energy each rank step keeps) and
costs c_i = m_i + n_i parameters per rank step; choose ranks k_i maximising Σ_i Σ_{j≤k_i} g_ij subject to
Σ_i k_i·c_i ≤ budget. Solved exactly:

1. modules of one cost form a class; within a class the best use of K steps is the K largest gains of the
   class (each module's gains are non-increasing, so the K largest are a prefix of every module's list):
   F_c(K) = that sum, concave in K;
2. a dynamic programme over the classes on the budget in units of g = gcd(costs):
   dp_c(b) = max_K dp_{c−1}(b − K·w_c) + F_c(K), w_c = c/g. With F_c concave this max-plus convolution is a
   Monge matrix product (the best K moves monotonically with b), computed by divide and conquer, all
   residues mod w_c at once, in O(U log U) for U = budget/g states;
3. back-tracking gives each class's K and step 1 each module's rank.

Real adapters have few classes (a Llama layer has two or three sizes) and a large gcd (hidden sizes are
multiples of 64), so U is small; past `MAX_STATES` the allocation falls back to the greedy by energy gained
per parameter (then kept only when it beats every uniform rank at the same cost) and says so. Uniform rank
is always a feasible point, so the exact allocation never keeps less energy than it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from workers.engines.compress.errors import CompressInputError

MAX_STATES = 1 << 23


@dataclass(frozen=True)
class Allocation:
    """Each module's rank, the parameters they cost, and how they were found (`exact` or `greedy`)."""

    ranks: dict[str, int]
    cost: int
    method: str


def energy_rank(gains: np.ndarray, energy: float) -> int:
    """The smallest k whose first k gains (descending σ²) keep `energy` of their sum; 0 when the sum is 0."""
    total = float(gains.sum())
    if total <= 0.0:
        return 0
    kept = np.cumsum(gains) / total
    return min(int(np.searchsorted(kept, energy - 1e-12)) + 1, int(gains.size))


def cost_of(ranks: Mapping[str, int], costs: Mapping[str, int]) -> int:
    return sum(k * costs[name] for name, k in ranks.items())


def kept_energy(ranks: Mapping[str, int], gains: Mapping[str, np.ndarray]) -> float:
    return float(sum(gains[name][:k].sum() for name, k in ranks.items()))


def best_uniform(gains: Mapping[str, np.ndarray], costs: Mapping[str, int], budget: int) -> dict[str, int]:
    """The largest rank u that every module can take (min(u, its rank)) within the budget."""
    top = max((g.size for g in gains.values()), default=0)
    best = {name: 0 for name in gains}
    for u in range(1, top + 1):
        ranks = {name: min(u, g.size) for name, g in gains.items()}
        if cost_of(ranks, costs) > budget:
            break
        best = ranks
    return best


def allocate_budget(
    gains: Mapping[str, np.ndarray], costs: Mapping[str, int], budget: int, max_states: int = MAX_STATES
) -> Allocation:
    """The ranks keeping the most energy within `budget` parameters (module docstring)."""
    if any(costs[name] <= 0 for name in gains):
        raise CompressInputError("every module must cost a positive number of parameters per rank step")
    classes: dict[int, list[str]] = {}
    for name, g in gains.items():
        if g.size:
            classes.setdefault(costs[name], []).append(name)
    ranks = {name: 0 for name in gains}
    if not classes:
        return Allocation(ranks, 0, "exact")
    unit = math.gcd(*classes)
    states = budget // unit
    if states > max_states:
        return _greedy(gains, costs, budget)
    tables = []
    for cost, members in sorted(classes.items()):
        values = np.concatenate([gains[name] for name in members]).astype(np.float64)
        owner = np.concatenate([np.full(gains[name].size, i) for i, name in enumerate(members)])
        order = np.argsort(-values, kind="stable")  # ties keep each module's own (descending) order
        tables.append((cost // unit, members, owner[order], np.concatenate([[0.0], np.cumsum(values[order])])))
    # dynamic programme over the classes: best energy within b units, and each class's step count
    step, _, _, first = tables[0]
    taken = np.minimum(np.arange(states + 1) // step, first.size - 1)
    best, choices = first[taken], [taken]
    for step, _, _, gained in tables[1:]:
        best, taken = maxplus_concave(best, gained, step)
        choices.append(taken)
    remaining = states
    for (step, members, owners, _), taken in zip(reversed(tables), reversed(choices), strict=True):
        count = int(taken[remaining])
        remaining -= count * step
        per_module = np.bincount(owners[:count], minlength=len(members))
        ranks.update({name: int(per_module[i]) for i, name in enumerate(members)})
    return Allocation(ranks, cost_of(ranks, costs), "exact")


def maxplus_concave(x: np.ndarray, gained: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """y[b] = max_{K ≥ 0, K·step ≤ b} x[b − K·step] + gained[min(K, N)], and the maximising K (≤ N).

    `x` is non-decreasing (best energy within a budget), `gained` concave and non-decreasing with
    gained[0] = 0 (N = len − 1). For each residue of b mod step, the matrix M[t, j] = x[j] + gained(t − j) is
    Monge, so the leftmost maximising column moves monotonically with the row t: divide and conquer on the
    rows, every residue and every open segment of a level evaluated in one vectorised pass.
    """
    size, n_max = x.size, gained.size - 1
    residues = min(step, size)
    lengths = (size - 1 - np.arange(residues)) // step + 1
    out, arg = np.empty(size), np.empty(size, dtype=np.int64)
    # open segments: residue, rows [lo, hi], columns [c_lo, c_hi]
    seg_p = np.arange(residues)
    lo, hi = np.zeros(residues, dtype=np.int64), lengths - 1
    c_lo, c_hi = np.zeros(residues, dtype=np.int64), lengths - 1
    while seg_p.size:
        mid = (lo + hi) // 2
        last = np.minimum(c_hi, mid)
        count = last - c_lo + 1
        starts = np.concatenate([[0], np.cumsum(count)[:-1]])
        total = int(count.sum())
        seg = np.repeat(np.arange(seg_p.size), count)
        col = c_lo[seg] + np.arange(total) - starts[seg]
        values = x[seg_p[seg] + col * step] + gained[np.minimum(mid[seg] - col, n_max)]
        top = np.maximum.reduceat(values, starts)
        first = np.minimum.reduceat(np.where(values == top[seg], np.arange(total), total), starts)
        best_col = col[first]
        flat = seg_p + mid * step
        out[flat] = top
        # beyond N steps there is nothing more to keep: x is non-decreasing, so K = N is as good
        arg[flat] = np.minimum(mid - best_col, n_max)
        left, right = lo < mid, mid < hi
        seg_p = np.concatenate([seg_p[left], seg_p[right]])
        lo, hi = np.concatenate([lo[left], mid[right] + 1]), np.concatenate([mid[left] - 1, hi[right]])
        c_lo, c_hi = np.concatenate([c_lo[left], best_col[right]]), np.concatenate([best_col[left], c_hi[right]])
    return out, arg


def _greedy(gains: Mapping[str, np.ndarray], costs: Mapping[str, int], budget: int) -> Allocation:
    """Rank steps by energy gained per parameter while they fit (each module's steps stay a prefix: its ratios
    are non-increasing and a step that does not fit never fits later); the best uniform rank if better."""
    steps = [(float(g[j]) / costs[name], name) for name, g in gains.items() for j in range(g.size)]
    steps.sort(key=lambda item: -item[0])
    ranks = {name: 0 for name in gains}
    left = budget
    for _, name in steps:
        if costs[name] <= left:
            ranks[name] += 1
            left -= costs[name]
    uniform = best_uniform(gains, costs, budget)
    if kept_energy(uniform, gains) > kept_energy(ranks, gains):
        ranks = uniform
    return Allocation(ranks, cost_of(ranks, costs), "greedy")
