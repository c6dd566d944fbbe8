"""The entry point: refusals before compute, rank resolution, NaN checks, progress, and the report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from app.schemas.merge import (
    CatParams,
    CtmParams,
    IsoCtsParams,
    KnotsParams,
    MergeOutput,
    MergeThenCompressParams,
    TaskArithmeticParams,
    TiesParams,
    TsvParams,
)
from tests.workers.engines.merge.helpers import delta, dense, make_tasks, rel
from workers.engines.merge.engine import merge_modules
from workers.engines.merge.errors import MergeInputError, MergeNumericError
from workers.engines.merge.types import TaskFactors
from workers.engines.registry import UnknownMethod


def test_different_base_shapes_are_refused_naming_the_module() -> None:
    modules = {"ok": make_tasks(0, 8, 6, [2, 2]), "bad.v_proj": make_tasks(1, 8, 6, [2]) + make_tasks(2, 9, 6, [2])}
    with pytest.raises(MergeInputError, match="bad.v_proj.*base shapes differ"):
        merge_modules("cat", modules, CatParams(), MergeOutput())


def test_too_many_adapters_are_refused() -> None:
    with pytest.raises(MergeInputError, match="at most 64"):
        merge_modules("task_arithmetic", {"m": make_tasks(0, 4, 4, [1] * 65)}, TaskArithmeticParams(), MergeOutput())


@pytest.mark.parametrize(
    ("modules", "output", "message"),
    [
        ({"a.q": make_tasks(0, 8, 6, [2])}, MergeOutput(rank_pattern={"k_proj": 2}), "match no module"),
        ({"a.q": make_tasks(0, 8, 6, [2])}, MergeOutput(rank_pattern={"q": 7}), "a.q.*exceeds min"),
        ({"a.q": [TaskFactors(torch.randn(2, 6), torch.randn(8, 3))]}, MergeOutput(), "a.q.*not a"),
        ({"a.q": [TaskFactors(torch.full((2, 6), float("nan")), torch.randn(8, 2))]}, MergeOutput(), "a.q.*NaN"),
        ({"a.q": [None, None]}, MergeOutput(), "a.q.*no adapter"),
        ({}, MergeOutput(), "no modules"),
        ({"a.q": make_tasks(0, 8, 6, [2]), "b": make_tasks(0, 8, 6, [2, 2])}, MergeOutput(), "'a.q'.*expected one"),
    ],
)
def test_refusals(modules, output, message) -> None:
    with pytest.raises(MergeInputError, match=message):
        merge_modules("task_arithmetic", modules, TaskArithmeticParams(), output)


def test_params_are_validated_with_the_method_model() -> None:
    tasks = {"m": make_tasks(0, 8, 6, [2])}
    with pytest.raises(MergeInputError, match="invalid parameters"):
        merge_modules("ties", tasks, CtmParams(), MergeOutput())  # beta is not a TIES parameter
    res = merge_modules("ties", tasks, TiesParams(density=1.0), MergeOutput())
    assert res.modules["m"].rank == 2
    with pytest.raises(UnknownMethod):
        merge_modules("svd", tasks, TiesParams(), MergeOutput())


def test_overflow_is_reported_as_a_numeric_error() -> None:
    big = [TaskFactors(torch.full((1, 4), 1e30), torch.full((4, 1), 1e30))]
    with pytest.raises(MergeNumericError):
        merge_modules("task_arithmetic", {"m": big}, TaskArithmeticParams(), MergeOutput())


def test_half_precision_inputs_are_upcast() -> None:
    tasks = [TaskFactors(f.lora_A.half(), f.lora_B.bfloat16()) for f in make_tasks(3, 8, 6, [2, 2])]
    out = merge_modules("task_arithmetic", {"m": tasks}, TaskArithmeticParams(), MergeOutput(rank=4)).modules["m"]
    assert out.lora_A.dtype == torch.float32
    expected = sum(f.lora_B.double() @ f.lora_A.double() for f in tasks)
    assert torch.allclose(dense(out), expected, atol=1e-4)


def test_progress_is_reported_in_order() -> None:
    seen: list[tuple[float, str]] = []
    modules = {f"m{i}": make_tasks(i, 8, 6, [2, 2]) for i in range(3)}
    merge_modules("ctm", modules, CtmParams(), MergeOutput(), progress=lambda f, s: seen.append((f, s)))
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", TiesParams(density=0.5)),
        ("ties", TiesParams(density=0.5, space="full")),
        ("knots", KnotsParams(rule="ties", density=0.5)),
        ("ctm", CtmParams(rule="ties", density=0.5)),
        ("cat", CatParams()),
    ],
)
def test_report_matches_dense_computation(method, params) -> None:
    tasks = make_tasks(4, 12, 9, [2, 3, 2])
    lam = 0.8
    params = params.model_copy(update={"lambda_": lam})
    res = merge_modules(method, {"m": [tasks[0], None, tasks[1], tasks[2]]}, params, MergeOutput())
    out = dense(res.modules["m"])
    rep = res.report["modules"]["m"]
    deltas = {0: delta(tasks[0]), 2: delta(tasks[1]), 3: delta(tasks[2])}
    reference = lam * sum(deltas.values())
    assert math.isclose(rep["deviation_from_sum"], float((out - reference).norm() / reference.norm()), abs_tol=1e-4)
    u = torch.linalg.svd(out, full_matrices=False)
    k = int((u[1] > u[1][0] * 1e-6).sum())
    basis_u, basis_v = u[0][:, :k], u[2][:k].mT
    for t, d in deltas.items():
        kept = float((basis_u.mT @ d @ basis_v).square().sum() / d.square().sum())
        assert math.isclose(rep["tasks"][t]["energy_kept_fraction"], kept, abs_tol=1e-5)
        for s, e in deltas.items():
            cos = float((d * e).sum() / (d.norm() * e.norm()))
            assert math.isclose(rep["cosine"][t][s], cos, abs_tol=1e-6)
    assert rep["tasks"][1] == {"task": 1, "present": False}
    assert rep["rank"] == res.modules["m"].rank
    summary = res.report["summary"]
    assert summary["energy_kept_fraction_worst_task"] <= summary["energy_kept_fraction_mean"] <= 1.0
    assert summary["energy_kept_fraction_per_task"][1] is None
    assert all(0.0 <= rep["tasks"][t]["sign_conflict"] <= 1.0 for t in deltas)


def test_adjacent_slices_are_stacked_in_place_and_others_are_copied() -> None:
    from workers.engines.merge.core_space import stack_factors

    buf_B, buf_A = torch.randn(8, 5), torch.randn(5, 6)
    tasks = [TaskFactors(buf_A[:2], buf_B[:, :2]), TaskFactors(buf_A[2:], buf_B[:, 2:])]
    stack = stack_factors("m", tasks)
    assert stack.lora_B.data_ptr() == buf_B.data_ptr() and torch.equal(stack.lora_B, buf_B)
    assert stack.lora_A.data_ptr() == buf_A.data_ptr() and torch.equal(stack.lora_A, buf_A)
    swapped = stack_factors("m", tasks[::-1])
    assert torch.equal(swapped.lora_B, torch.cat([buf_B[:, 2:], buf_B[:, :2]], 1))
    assert swapped.lora_B.data_ptr() != buf_B.data_ptr()
    separate = stack_factors("m", make_tasks(0, 8, 6, [2, 3]))
    assert separate.lora_B.shape == (8, 5) and separate.lora_A.shape == (5, 6)


def test_report_records_params_and_output() -> None:
    res = merge_modules("ties", {"m": make_tasks(0, 8, 6, [2, 2])}, TiesParams(density=0.5), MergeOutput(rank=2))
    assert res.report["params"]["density"] == 0.5 and res.report["params"]["lambda"] == 1.0
    assert res.report["output"]["rank"] == 2
    json.dumps(res.report)


def test_two_threads_with_the_linalg_pool_give_the_one_thread_result() -> None:
    """On two threads the small decompositions are split over the one-thread pool (workers/engines/linalg_pool.py):
    the merge and its report must not change (a batch large enough to take the pool: 8 modules, K = 48)."""
    modules = {f"layers.{i}.q": make_tasks(300 + i, 64, 72, [8] * 6) for i in range(8)}
    cases = [
        ("ctm", CtmParams(rule="ties", density=0.5, beta=0.5)),
        ("tsv", TsvParams()),
        ("iso_cts", IsoCtsParams()),
        ("merge_then_compress", MergeThenCompressParams(rule="ties", space="core", density=0.5)),
    ]
    before = torch.get_num_threads()
    try:
        for method, params in cases:
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results.append(merge_modules(method, modules, params, MergeOutput(rank=8)))
            one, two = results
            for name in modules:
                assert rel(dense(two.modules[name]), dense(one.modules[name])) < 1e-9, (method, name)
            for key in ("energy_kept_fraction_mean", "deviation_from_sum_total", "compression_error_total"):
                a, b = one.report["summary"][key], two.report["summary"][key]
                assert (a is None and b is None) or abs(a - b) < 1e-9, (method, key)
    finally:
        torch.set_num_threads(before)
