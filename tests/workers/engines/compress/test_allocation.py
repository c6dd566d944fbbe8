"""The budget allocation is exact: it matches brute force on small cases, never exceeds the budget and never
keeps less energy than one uniform rank at the same cost."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from workers.engines.compress.allocation import (
    allocate_budget,
    best_uniform,
    cost_of,
    energy_rank,
    kept_energy,
    maxplus_concave,
)


def brute_force(gains, costs, budget) -> float:
    best = 0.0
    names = list(gains)
    for ranks in itertools.product(*(range(gains[n].size + 1) for n in names)):
        chosen = dict(zip(names, ranks, strict=True))
        if cost_of(chosen, costs) <= budget:
            best = max(best, kept_energy(chosen, gains))
    return best


def random_case(rng: np.random.Generator):
    gains, costs = {}, {}
    for i in range(int(rng.integers(1, 5))):
        g = np.sort(rng.random(int(rng.integers(1, 5))) ** 3)[::-1] * rng.random()
        if rng.random() < 0.3:  # ties and repeated values
            g = np.round(g, 1)
            g = g[g > 0]
        gains[f"m{i}"] = np.ascontiguousarray(g)
        costs[f"m{i}"] = int(rng.choice([4, 6, 7, 8, 10, 12]))
    full = sum(costs[n] * gains[n].size for n in gains)
    return gains, costs, int(rng.integers(0, full + 5))


def test_matches_brute_force_and_never_exceeds_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(300):
        gains, costs, budget = random_case(rng)
        allocation = allocate_budget(gains, costs, budget)
        assert allocation.method == "exact"
        assert allocation.cost == cost_of(allocation.ranks, costs) <= budget
        assert all(0 <= allocation.ranks[n] <= gains[n].size for n in gains)
        assert kept_energy(allocation.ranks, gains) == pytest.approx(brute_force(gains, costs, budget), abs=1e-12)


def test_never_keeps_less_than_a_uniform_rank_at_the_same_cost():
    rng = np.random.default_rng(1)
    for _ in range(100):
        gains, costs, budget = random_case(rng)
        uniform = best_uniform(gains, costs, budget)
        assert cost_of(uniform, costs) <= budget
        allocation = allocate_budget(gains, costs, cost_of(uniform, costs))
        assert kept_energy(allocation.ranks, gains) >= kept_energy(uniform, gains) - 1e-12


def test_a_skewed_spectrum_gets_more_rank_than_uniform():
    # one module holds most of the energy: the budget of rank 2 everywhere is better spent on it
    gains = {"big": np.array([8.0, 4.0, 2.0, 1.0]), "small": np.array([0.1, 0.05, 0.01, 0.001])}
    costs = {"big": 10, "small": 10}
    allocation = allocate_budget(gains, costs, 40)
    assert allocation.ranks == {"big": 4, "small": 0}


def test_greedy_fallback_beyond_the_state_cap_is_labelled_and_within_budget():
    rng = np.random.default_rng(2)
    gains, costs, budget = random_case(rng)
    allocation = allocate_budget(gains, costs, budget, max_states=-1)
    assert allocation.method == "greedy" and allocation.cost <= budget
    assert kept_energy(allocation.ranks, gains) >= kept_energy(best_uniform(gains, costs, budget), gains) - 1e-12


def test_maxplus_concave_is_the_plain_max():
    rng = np.random.default_rng(3)
    for _ in range(50):
        x = np.maximum.accumulate(rng.random(int(rng.integers(1, 40))))
        gained = np.concatenate([[0.0], np.cumsum(np.sort(rng.random(int(rng.integers(1, 6))))[::-1])])
        step = int(rng.integers(1, 5))
        got, arg = maxplus_concave(x, gained, step)
        for b in range(x.size):
            options = [x[b - k * step] + gained[min(k, gained.size - 1)] for k in range(b // step + 1)]
            assert got[b] == pytest.approx(max(options))
            assert x[b - arg[b] * step] + gained[arg[b]] == pytest.approx(got[b])


def test_energy_rank():
    gains = np.array([4.0, 3.0, 2.0, 1.0])
    assert energy_rank(gains, 1.0) == 4
    assert energy_rank(gains, 0.4) == 1
    assert energy_rank(gains, 0.41) == 2
    assert energy_rank(gains, 0.7) == 2
    assert energy_rank(np.zeros(3), 0.9) == 0
