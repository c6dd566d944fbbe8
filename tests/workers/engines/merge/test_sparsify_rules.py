"""Unit tests of the shared pruning, sign election and rule dispatch."""

from __future__ import annotations

import pytest
import torch

from tests.workers.engines.merge.helpers import plain_ties
from workers.engines.merge.rules import RULES, RuleOptions, apply_rule
from workers.engines.merge.sparsify import (
    breadcrumbs_mask,
    disjoint_mean,
    elect_sign,
    magnitude_mask,
    sign_conflicts,
    sparsify,
    streamed_magnitudes,
)


def test_magnitude_mask_keeps_top_k_per_task() -> None:
    x = torch.tensor([[[1.0, -5.0, 3.0, 0.5], [2.0, 0.1, -0.2, -4.0]]])
    mask = magnitude_mask(x, 0.5)
    assert mask.tolist() == [[[False, True, True, False], [True, False, False, True]]]
    assert magnitude_mask(x, 1.0).all() and not magnitude_mask(x, 0.0).any()


def test_breadcrumbs_drops_the_largest_and_the_smallest() -> None:
    x = torch.tensor([[[1.0, -5.0, 3.0, 0.5, 2.0]]])
    # gamma 0.2 drops the top 1 (-5), density 0.4 keeps the next 2 (3, 2)
    assert breadcrumbs_mask(x, 0.4, 0.2).tolist() == [[[False, False, True, False, True]]]


def test_dare_rescales_and_density_zero_is_zero_not_nan() -> None:
    x = torch.randn(2, 3, 1000, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    y = sparsify(x, "random", 0.3, generators=gens)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.3)
    assert 0.2 < kept.double().mean() < 0.4
    z = sparsify(x, "random", 0.0)
    assert torch.equal(z, torch.zeros_like(x)) and torch.isfinite(z).all()
    assert torch.equal(sparsify(x, "random", 1.0), x)


def test_sign_election_and_disjoint_mean() -> None:
    x = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 1.0, -1.0], [-1.0, -2.0, 0.0]]])
    sign = elect_sign(x, "total")
    assert sign.tolist() == [[1.0, -1.0, -1.0]]
    assert elect_sign(x, "frequency").tolist() == [[1.0, -1.0, -1.0]]
    assert disjoint_mean(x, sign).tolist() == [[2.0, -2.0, -1.0]]
    # task 0: entries (1, -2) agree; task 1: (3 agrees, 1 disagrees, -1 agrees); task 2: (-1 disagrees, -2 agrees)
    assert torch.allclose(sign_conflicts(x, sign), torch.tensor([[0.0, 1 / 3, 0.5]], dtype=torch.float64))


def test_frequency_differs_from_total() -> None:
    x = torch.tensor([[[10.0], [-1.0], [-1.0]]])
    assert elect_sign(x, "total").item() == 1.0
    assert elect_sign(x, "frequency").item() == -1.0


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_ties_rule_matches_plain_reference(density: float) -> None:
    x = torch.randn(1, 4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = apply_rule("ties", x, RuleOptions(density=density), ["m"])
    assert torch.allclose(out.merged[0], plain_ties(x[0], density))
    assert torch.isfinite(out.merged).all()


def test_linear_rules_at_density_one_are_sums() -> None:
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    for name in ("task_arithmetic", "dare_linear", "magnitude_prune"):
        assert torch.allclose(apply_rule(name, x, RuleOptions(density=1.0), ["a", "b"]).merged, x.sum(1))


def test_dare_is_seeded_per_group_key() -> None:
    x = torch.randn(1, 3, 200, dtype=torch.float64)
    a = apply_rule("dare_linear", x, RuleOptions(density=0.5, seed=3), ["mod"]).merged
    b = apply_rule("dare_linear", x, RuleOptions(density=0.5, seed=3), ["mod"]).merged
    c = apply_rule("dare_linear", x, RuleOptions(density=0.5, seed=4), ["mod"]).merged
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_schema_rule_is_dispatchable() -> None:
    from typing import get_args

    from app.schemas.merge import MergeRule

    assert set(get_args(MergeRule)) == set(RULES)


@pytest.mark.parametrize("seed", range(5))
def test_streamed_magnitudes_are_exact_order_statistics(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(3, n, generator=g) * float(torch.rand(1, generator=g)) * 10 for n in (50, 7, 1000, 3)]
    chunks[1][0] = 0.0  # a task without this module: zeros count as entries
    chunks[2][1, :10] = -chunks[2][1, 10:20]  # ties in magnitude
    everything = torch.cat(chunks, dim=1).abs()
    n = everything.shape[1]
    ranks = [0, 1, 17, n // 2, n - 11, n - 1]
    seen: list[int] = []
    got = streamed_magnitudes(lambda: iter(chunks), lambda total: seen.append(total) or ranks)
    assert seen == [n]
    assert torch.equal(got, everything.sort(dim=1, descending=True).values[:, ranks])
    with pytest.raises(ValueError, match="same tasks"):
        streamed_magnitudes(lambda: iter([torch.ones(2, 3), torch.ones(1, 2)]), lambda total: [0])
