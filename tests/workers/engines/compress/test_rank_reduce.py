"""rank_reduce: known answers against the dense SVD of ΔW (the reference route)."""

from __future__ import annotations

import math

import pytest
import torch

from app.checks.peft_patterns import PeftPattern
from app.schemas.compress import RankReduceParams
from tests.workers.engines.compress.helpers import best_rank, dense, job, module, out_dense, rel
from workers.engines.compress.lowrank import factor_svd
from workers.engines.compress.rank_reduce import rank_reduce
from workers.engines.compress.types import AdapterModule

PARAMS = RankReduceParams()


def modules():
    return {
        "q": module(0, 48, 32, r=8, scaling=2.0),
        "v": module(1, 32, 32, r=8, scaling=0.5, rank=3),  # stored rank 8, true rank 3
        "down": module(2, 32, 64, r=8, scaling=8 / math.sqrt(8)),  # rsLoRA-like scaling
    }


def test_factor_svd_is_the_svd_of_the_product():
    m = module(3, 40, 24, r=6, scaling=1.5)
    spectrum = factor_svd(m.lora_B, m.lora_A, m.scaling)
    reference = torch.linalg.svdvals(dense(m))
    torch.testing.assert_close(spectrum.values, reference[:6], rtol=1e-5, atol=0)
    left, right = (x.double() for x in spectrum.vectors(6))
    torch.testing.assert_close(left.mT @ left, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(right @ right.mT, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    assert rel((left * spectrum.values) @ right, dense(m)) < 1e-6
    assert spectrum.tail(2) == pytest.approx(float(reference[2:].square().sum()), rel=1e-6)


def test_factor_svd_of_rank_deficient_and_wide_factors():
    deficient = module(8, 64, 40, r=8, rank=2, scaling=3.0)  # stored rank 8, true rank 2: R_B is singular
    spectrum = factor_svd(deficient.lora_B, deficient.lora_A, deficient.scaling)
    assert spectrum.rank == 2
    lora_B, lora_A = spectrum.factors(2)
    assert rel(lora_B.double() @ lora_A.double(), dense(deficient)) < 1e-5
    wide = module(9, 6, 10, r=12)  # r larger than m and n
    spectrum = factor_svd(wide.lora_B, wide.lora_A, wide.scaling)
    assert spectrum.rank == 6
    lora_B, lora_A = spectrum.factors(6)
    assert lora_B.shape == (6, 6) and lora_A.shape == (6, 10)
    assert rel(lora_B.double() @ lora_A.double(), dense(wide)) < 1e-5


def test_rank_at_or_above_the_true_rank_is_exact():
    mods = {"v": module(1, 32, 32, r=8, rank=3), "x": module(4, 24, 40, r=5, rank=5)}
    result = rank_reduce(job(mods, rank=5), PARAMS)
    assert result.modules["v"].rank == 3 and result.modules["x"].rank == 5  # never above the numerical rank
    for name, m in mods.items():
        assert rel(out_dense(result.modules[name]), dense(m)) < 1e-5
        assert result.report["modules"][name]["rel_error"] < 1e-5
    assert result.report["summary"]["rel_error"] < 1e-5


def test_truncation_equals_the_dense_best_rank_k():
    mods = modules()
    result = rank_reduce(job(mods, rank=2), PARAMS)
    for name, m in mods.items():
        out = result.modules[name]
        assert out.rank == 2 and out.scaling == 1.0
        reference = best_rank(dense(m), 2)
        assert rel(out_dense(out), reference) < 1e-5  # the same matrix as torch.linalg.svd of ΔW, truncated
        expected = rel(reference, dense(m))
        assert result.report["modules"][name]["rel_error"] == pytest.approx(expected, rel=1e-4)
        s = torch.linalg.svdvals(dense(m))
        kept = float(s[:2].square().sum() / s.square().sum())
        assert result.report["modules"][name]["energy_kept"] == pytest.approx(kept, rel=1e-5)


def test_factors_are_balanced():
    result = rank_reduce(job({"q": module(0, 48, 32, r=8, scaling=3.0)}, rank=4), PARAMS)
    out = result.modules["q"]
    torch.testing.assert_close(out.lora_B.norm(dim=0), out.lora_A.norm(dim=1), rtol=1e-4, atol=0)


def test_energy_one_changes_nothing():
    mods = modules()
    result = rank_reduce(job(mods, energy=1.0), PARAMS)
    assert result.modules["q"].rank == 8 and result.modules["v"].rank == 3
    for name, m in mods.items():
        assert rel(out_dense(result.modules[name]), dense(m)) < 1e-5
    assert result.report["summary"]["energy_kept"] == pytest.approx(1.0, abs=1e-9)


def test_energy_picks_the_smallest_rank_keeping_it():
    m = module(5, 64, 48, r=12)
    s2 = torch.linalg.svdvals(dense(m)).square()
    fraction = (s2.cumsum(0) / s2.sum())
    target = float(fraction[4]) - 1e-6  # rank 5 keeps it, rank 4 does not
    result = rank_reduce(job({"m": m}, energy=target), PARAMS)
    assert result.modules["m"].rank == 5
    assert result.report["modules"]["m"]["energy_kept"] >= target


def test_budget_is_never_exceeded_and_beats_uniform():
    mods = modules()
    costs = {name: sum(m.shape) for name, m in mods.items()}
    for budget in (costs["v"], 300, 700, 1000, 10_000):
        result = rank_reduce(job(mods, budget_params=budget), PARAMS)
        used = sum(c.rank * costs[name] for name, c in result.modules.items())
        assert used <= budget
        assert result.report["summary"]["params_out"] == used
        rule = result.report["size_rule"]
        assert rule["params_used"] == used and rule["allocation"] == "exact"
        assert rule["energy_kept"] >= rule["uniform_energy_kept"] - 1e-12
        assert result.report["summary"]["energy_kept"] == pytest.approx(rule["energy_kept"], abs=1e-6)
        for name in result.dropped:
            assert name not in result.modules and result.report["modules"][name]["rank_out"] == 0


def test_budget_of_one_module_keeps_its_best_direction_only():
    mods = modules()
    # 64 parameters: one rank step of v (32×32); q (48×32) and down (32×64) cost more than the whole budget
    result = rank_reduce(job(mods, budget_params=sum(mods["v"].shape)), PARAMS)
    assert {name: c.rank for name, c in result.modules.items()} == {"v": 1}
    assert sorted(result.dropped) == ["down", "q"]


def test_rank_pattern_follows_peft_rule_and_others_keep_their_rank():
    mods = modules()
    pattern = PeftPattern.compile({"q": 2, "^d.*": 1}, "rank_pattern")
    result = rank_reduce(job(mods, pattern=pattern), PARAMS)
    assert result.modules["q"].rank == 2 and result.modules["down"].rank == 1
    assert result.modules["v"].rank == 3


def test_a_zero_module_is_dropped():
    zero = AdapterModule(lora_A=torch.randn(4, 16), lora_B=torch.zeros(16, 4), scaling=1.0)
    result = rank_reduce(job({"zero": zero, "q": module(0, 16, 16, r=4)}, rank=2), PARAMS)
    assert result.dropped == ["zero"] and set(result.modules) == {"q"}
    assert result.report["modules"]["zero"]["rel_error"] == 0.0


def test_bf16_input_keeps_its_dtype_and_states_the_rounding():
    mods = {"q": module(0, 48, 32, r=8, scaling=2.0, dtype=torch.bfloat16)}
    result = rank_reduce(job(mods, rank=8), PARAMS)
    assert result.modules["q"].lora_A.dtype == torch.bfloat16
    error = result.report["modules"]["q"]["rel_error"]
    assert 1e-4 < error < 2e-2  # truncation is exact at rank 8; bf16 rounding of the output remains
    assert error == pytest.approx(rel(out_dense(result.modules["q"]), dense(mods["q"])), rel=1e-3)
    assert result.report["summary"]["bytes_out"] == 8 * (48 + 32) * 2
