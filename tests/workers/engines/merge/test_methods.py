"""Known answers against plain dense references, and invariants, for every registered merge method."""

from __future__ import annotations

import pytest
import torch

from app.schemas.merge import (
    MERGE_PARAMS,
    CatParams,
    CtmParams,
    KnotsParams,
    MergeOutput,
    MergeThenCompressParams,
    TaskArithmeticParams,
    TiesParams,
)
from tests.workers.engines.merge.helpers import best_rank, core_space, delta, dense, make_tasks, plain_ties, rel
from workers.engines import registry
from workers.engines.merge.engine import merge_modules
from workers.engines.merge.types import TaskFactors

M, N = 24, 18
ALL = sorted(m for m, model in MERGE_PARAMS.items() if not model.calibrated)  # rain: test_rain.py
LINEAR = ["task_arithmetic", "merge_then_compress", "knots", "ctm", "cat"]


def params(method: str, **kw):
    """The method's params model from the keywords it has (others are ignored, so one call fits all)."""
    model = MERGE_PARAMS[method]
    names = set(model.model_fields) | {"lambda"}
    return model.model_validate({k: v for k, v in kw.items() if k in names})


def run(method: str, modules, out: MergeOutput | None = None, **kw):
    return merge_modules(method, modules, params(method, **kw), out or MergeOutput())


def test_registry_matches_schema() -> None:
    assert registry.names("merge") == sorted(MERGE_PARAMS)
    for name, model in MERGE_PARAMS.items():
        assert registry.get("merge", name).params_model is model


def test_cat_is_exact_with_rank_sum_and_lambda() -> None:
    tasks = make_tasks(0, M, N, [2, 3, 4])
    res = merge_modules("cat", {"m": tasks}, CatParams.model_validate({"lambda": 0.7}), MergeOutput(rank=1))
    out = res.modules["m"]
    assert out.rank == 9
    assert rel(dense(out), 0.7 * sum(delta(f) for f in tasks)) < 1e-6
    assert res.report["modules"]["m"]["deviation_from_sum"] < 1e-5
    assert res.report["modules"]["m"]["compression_error"] == 0.0


@pytest.mark.parametrize("space", ["core", "full"])
def test_task_arithmetic_is_the_best_rank_r_approximation(space: str) -> None:
    tasks = make_tasks(1, M, N, [3, 3, 3])
    total = sum(delta(f) for f in tasks)
    for k in (1, 3, 5):
        res = merge_modules("task_arithmetic", {"m": tasks}, TaskArithmeticParams(space=space), MergeOutput(rank=k))
        assert res.modules["m"].rank == k
        assert rel(dense(res.modules["m"]), best_rank(total, k)) < 1e-5
    # default rank: the largest input rank
    assert run("task_arithmetic", {"m": tasks}, space=space).modules["m"].rank == 3


def test_rank_above_the_exact_rank_gives_the_exact_update_without_padding() -> None:
    tasks = make_tasks(2, M, N, [2, 1])
    for method in ("task_arithmetic", "merge_then_compress", "ctm", "knots"):
        out = run(method, {"m": tasks}, MergeOutput(rank=50)).modules["m"]
        assert out.rank == 3, method
        assert rel(dense(out), sum(delta(f) for f in tasks)) < 1e-5, method


def test_core_space_linear_equals_full_space() -> None:
    tasks = make_tasks(3, M, N, [2, 4, 3])
    for k in (2, 6, 9):
        core = run("task_arithmetic", {"m": tasks}, MergeOutput(rank=k), space="core").modules["m"]
        full = run("task_arithmetic", {"m": tasks}, MergeOutput(rank=k), space="full").modules["m"]
        assert rel(dense(core), dense(full)) < 1e-5


def test_core_space_ties_matches_a_plain_reference() -> None:
    tasks = make_tasks(4, M, N, [2, 2, 3])
    u, v, cores = core_space(tasks)
    merged = plain_ties(torch.stack([c.flatten() for c in cores]), 0.4).reshape(cores[0].shape)
    expected = u @ merged @ v.mT
    out = merge_modules("ties", {"m": tasks}, TiesParams(density=0.4), MergeOutput(rank=50)).modules["m"]
    assert rel(dense(out), expected) < 1e-5
    k = 3
    out_k = merge_modules("ties", {"m": tasks}, TiesParams(density=0.4), MergeOutput(rank=k)).modules["m"]
    assert rel(dense(out_k), best_rank(expected, k)) < 1e-5


def test_full_space_ties_matches_a_plain_reference() -> None:
    tasks = make_tasks(5, 6, 5, [2, 2, 1])
    merged = plain_ties(torch.stack([delta(f).flatten() for f in tasks]), 0.5).reshape(6, 5)
    out = merge_modules("ties", {"m": tasks}, TiesParams(density=0.5, space="full"), MergeOutput(rank=6)).modules["m"]
    assert rel(dense(out), merged) < 1e-5


@pytest.mark.parametrize("space", ["core", "full"])
def test_ties_density_one_on_agreeing_signs_is_the_mean(space: str) -> None:
    # copies of one adapter with positive weights: every representation agrees in sign
    base = make_tasks(6, M, N, [3])[0]
    weights = [0.5, 1.0, 2.0]
    tasks = [TaskFactors(base.lora_A, base.lora_B * w) for w in weights]
    ties = merge_modules("ties", {"m": tasks}, TiesParams(density=1.0, space=space), MergeOutput()).modules["m"]
    ta = merge_modules(
        "task_arithmetic",
        {"m": tasks},
        TaskArithmeticParams.model_validate({"lambda": 1 / 3, "space": space}),
        MergeOutput(),
    ).modules["m"]
    assert rel(dense(ties), dense(ta)) < 1e-5
    assert rel(dense(ties), delta(base) * sum(weights) / 3) < 1e-5


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs"])
@pytest.mark.parametrize("space", ["core", "full"])
def test_density_zero_gives_zeros_without_nan(method: str, space: str) -> None:
    tasks = make_tasks(7, M, N, [2, 3])
    res = run(method, {"m": tasks}, density=0.0, space=space, gamma=0.0)
    out = res.modules["m"]
    assert torch.isfinite(out.lora_A).all() and torch.isfinite(out.lora_B).all()
    assert dense(out).abs().max() == 0


@pytest.mark.parametrize("method", ["merge_then_compress", "ctm", "knots"])
def test_rule_methods_density_zero(method: str) -> None:
    tasks = make_tasks(7, M, N, [2, 3])
    out = run(method, {"m": tasks}, rule="dare_ties", density=0.0).modules["m"]
    assert dense(out).abs().max() == 0


@pytest.mark.parametrize("method", ALL)
def test_single_adapter_weight_one_is_itself(method: str) -> None:
    (task,) = make_tasks(8, M, N, [4])
    kw = {"density": 1.0} if "density" in MERGE_PARAMS[method].model_fields else {}
    if "gamma" in MERGE_PARAMS[method].model_fields:
        kw["gamma"] = 0.0
    out = run(method, {"m": [task]}, MergeOutput(rank=4), **kw).modules["m"]
    expected = delta(task)
    if method in ("iso_c", "iso_cts"):  # isotropic by definition: the adapter with its spectrum flattened
        u, s, vh = torch.linalg.svd(expected, full_matrices=False)
        expected = (u[:, :4] * s[:4].mean()) @ vh[:4]
    assert rel(dense(out), expected) < 1e-5, method


@pytest.mark.parametrize("method", ["task_arithmetic", "merge_then_compress", "knots", "ctm", "dare_linear"])
def test_copies_with_weights_one_over_t_give_the_adapter(method: str) -> None:
    (task,) = make_tasks(9, M, N, [3])
    t = 4
    copies = [TaskFactors(task.lora_A, task.lora_B / t) for _ in range(t)]
    out = (
        run(method, {"m": copies}, density=1.0).modules["m"]
        if method == "dare_linear"
        else run(method, {"m": copies}).modules["m"]
    )
    assert out.rank == 3
    assert rel(dense(out), delta(task)) < 1e-5, method


@pytest.mark.parametrize("method", ALL)
def test_adapter_order_does_not_change_the_result(method: str) -> None:
    tasks = make_tasks(10, M, N, [3, 3, 3])
    kw = {"density": 0.5} if "density" in MERGE_PARAMS[method].model_fields else {}
    if method in ("dare_linear", "dare_ties") or kw.get("rule", "").startswith("dare"):
        kw["density"] = 1.0  # random pruning is seeded per task position
    a = run(method, {"m": tasks}, **kw).modules["m"]
    b = run(method, {"m": tasks[::-1]}, **kw).modules["m"]
    # ctm's subspaces are HOOI's: it stops when the objective improves by < 1e-6 relative, so two orders
    # (whose core bases, and so rounding, differ) agree to about its square root (measured up to 9e-4)
    assert rel(dense(a), dense(b)) < (3e-3 if method == "ctm" else 1e-4), method


@pytest.mark.parametrize("rule", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs"])
@pytest.mark.parametrize("method", ["ctm", "merge_then_compress"])
def test_rank_at_most_r(method: str, rule: str) -> None:
    tasks = make_tasks(11, M, N, [4, 4, 4])
    for r in (1, 2, 4):
        res = run(method, {"m": tasks}, MergeOutput(rank=r), rule=rule, density=0.5)
        assert 1 <= res.modules["m"].rank <= r


def test_ctm_with_task_arithmetic_matches_a_plain_reference() -> None:
    tasks = make_tasks(12, M, N, [3, 3, 3])
    r = 3
    u, v, cores = core_space(tasks)
    # plain HOOI with full eigendecompositions, β = 1 (no balancing)
    stack = torch.stack(cores)

    def top(sym: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(sym)[1][:, -r:]

    p = top((stack @ stack.mT).sum(0))
    q = top((stack.mT @ stack).sum(0))
    for _ in range(500):
        p = top(sum(c @ q @ q.mT @ c.mT for c in cores))
        q = top(sum(c.mT @ p @ p.mT @ c for c in cores))
    expected = (u @ p) @ sum(p.mT @ c @ q for c in cores) @ (v @ q).mT
    fit = sum(float((p.mT @ c @ q).square().sum()) for c in cores) / float(stack.square().sum())
    for balanced in (True, False):
        res = merge_modules(
            "ctm", {"m": tasks}, CtmParams(beta=1.0, balanced=balanced, max_iter=1000), MergeOutput(rank=r)
        )
        out = res.modules["m"]
        assert out.rank <= r
        # HOOI stops when the objective improves by < 1e-6 relative: the fit agrees to that order, the
        # subspaces (and so the update) to about its square root
        assert abs(res.report["modules"]["m"]["tucker_fit"] - fit) < 1e-5
        assert rel(dense(out), expected) < 3e-3


def test_ctm_balanced_and_plain_factorisations_agree_and_lambda_scales() -> None:
    tasks = make_tasks(13, M, N, [2, 3, 2])
    a = merge_modules("ctm", {"m": tasks}, CtmParams(rule="ties", density=0.6, balanced=True), MergeOutput())
    b = merge_modules("ctm", {"m": tasks}, CtmParams(rule="ties", density=0.6, balanced=False), MergeOutput())
    c = merge_modules(
        "ctm", {"m": tasks}, CtmParams.model_validate({"rule": "ties", "density": 0.6, "lambda": -0.5}), MergeOutput()
    )
    assert rel(dense(a.modules["m"]), dense(b.modules["m"])) < 1e-5
    assert rel(dense(c.modules["m"]), -0.5 * dense(a.modules["m"])) < 1e-5
    report = a.report["modules"]["m"]
    assert report["hooi_sweeps"] >= 1 and report["tucker_fit"] >= report["tucker_fit_start"] - 1e-9


def test_ctm_isotropize_flattens_the_spectrum() -> None:
    tasks = make_tasks(14, M, N, [3, 3])
    out = merge_modules("ctm", {"m": tasks}, CtmParams(isotropize=True), MergeOutput(rank=3)).modules["m"]
    s = torch.linalg.svdvals(dense(out))[:3]
    assert torch.allclose(s, s.mean().expand(3), rtol=1e-5)


def test_knots_task_arithmetic_is_exact_at_full_rank_and_ties_uses_a_global_threshold() -> None:
    tasks_a = make_tasks(15, M, N, [2, 2])
    tasks_b = make_tasks(16, M, N, [2, 2], scale=100.0)  # a module with much larger entries
    out = run("knots", {"a": tasks_a}, MergeOutput(rank=10)).modules["a"]
    assert rel(dense(out), sum(delta(f) for f in tasks_a)) < 1e-5
    # with the threshold per task over the whole adapter, the small module loses everything at low density
    res = merge_modules(
        "knots", {"a": tasks_a, "b": tasks_b}, KnotsParams(rule="ties", density=0.3), MergeOutput(rank=10)
    )
    assert dense(res.modules["a"]).abs().max() == 0
    assert dense(res.modules["b"]).abs().max() > 0
    # alone, the small module keeps its share
    alone = merge_modules("knots", {"a": tasks_a}, KnotsParams(rule="ties", density=0.3), MergeOutput(rank=10))
    assert dense(alone.modules["a"]).abs().max() > 0


def _plain_knots(modules: dict[str, list[TaskFactors]], prune, merge) -> dict[str, torch.Tensor]:
    """KnOTS written plainly on dense updates: SVD of [ΔW_1 … ΔW_T] per module, the task blocks ΣV_tᵀ of
    every module concatenated per task, pruned over the whole adapter, merged, lifted back with U."""
    aligned = {}
    for name, tasks in modules.items():
        u, s, vh = torch.linalg.svd(torch.cat([delta(f) for f in tasks], dim=1), full_matrices=False)
        k = int((s > s[0] * 1e-6).sum())
        reps = (s[:k, None] * vh[:k]).reshape(k, len(tasks), -1).permute(1, 0, 2)  # (T, k, n)
        aligned[name] = (u[:, :k], reps)
    values = torch.cat([reps.flatten(1) for _, reps in aligned.values()], dim=1)  # (T, all entries)
    merged = merge(prune(values))
    out, start = {}, 0
    for name, (u, reps) in aligned.items():
        size = reps.shape[1] * reps.shape[2]
        out[name] = u @ merged[start : start + size].reshape(reps.shape[1:])
        start += size
    return out


def _keep_ranks(values: torch.Tensor, first: int, count: int) -> torch.Tensor:
    order = values.abs().argsort(dim=1, descending=True)
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask.scatter_(1, order[:, first : first + count], True)
    return values * mask


@pytest.mark.parametrize(
    ("rule", "kw"),
    [
        ("ties", {"density": 0.3}),
        ("magnitude_prune", {"density": 0.2}),
        ("breadcrumbs", {"density": 0.4, "gamma": 0.1}),
    ],
)
def test_knots_ranks_each_task_over_the_whole_adapter_like_a_plain_reference(rule: str, kw: dict) -> None:
    modules = {
        "a": make_tasks(40, M, N, [2, 3]),
        "b": make_tasks(41, 12, N, [2, 3], scale=3.0),
        "c": make_tasks(42, M, 9, [2, 3], scale=0.5),
    }
    first, density = kw.get("gamma", 0.0), kw["density"]

    def prune(values: torch.Tensor) -> torch.Tensor:
        n = values.shape[1]
        return _keep_ranks(values, int(first * n), int(density * n))

    def merge(pruned: torch.Tensor) -> torch.Tensor:
        return plain_ties(pruned, 1.0) if rule == "ties" else pruned.sum(0)

    expected = _plain_knots(modules, prune, merge)
    res = merge_modules("knots", modules, KnotsParams.model_validate({"rule": rule, **kw}), MergeOutput(rank=20))
    for name, want in expected.items():
        assert rel(dense(res.modules[name]), want) < 1e-5, (rule, name)


def test_knots_prunes_everything_at_density_zero() -> None:
    modules = {"a": make_tasks(43, M, N, [2, 2]), "b": make_tasks(44, M, N, [2, 2])}
    res = merge_modules("knots", modules, KnotsParams(rule="ties", density=0.0), MergeOutput(rank=4))
    assert all(dense(out).abs().max() == 0 for out in res.modules.values())


@pytest.mark.parametrize(("m", "n", "ranks"), [(3, 4, [2, 1, 1]), (11, 8, [2, 2, 4, 1])])
def test_a_stack_wider_than_the_layer_adds_no_spurious_direction(m: int, n: int, ranks: list[int]) -> None:
    """K = Σr above m (or n): the stack's Gram is singular, and its float32 noise must not become an extra
    output direction (found by the property test: rank min(m, n) + 1)."""
    for seed in range(25):
        tasks = make_tasks(seed, m, n, ranks)
        total = sum(delta(f) for f in tasks)
        for method, kw in (("task_arithmetic", {}), ("merge_then_compress", {}), ("ctm", {"rule": "task_arithmetic"})):
            out = run(method, {"m": tasks}, MergeOutput(rank=64), **kw).modules["m"]
            assert out.rank <= min(m, n), (seed, method)
            assert rel(dense(out), total) < 1e-5, (seed, method)


def test_missing_modules_count_as_zero_updates() -> None:
    tasks = make_tasks(17, M, N, [2, 3, 2])
    modules = {"m": [tasks[0], None, tasks[2]]}
    for method in ("cat", "task_arithmetic", "ctm", "knots"):
        out = run(method, modules, MergeOutput(rank=20)).modules["m"]
        assert rel(dense(out), delta(tasks[0]) + delta(tasks[2])) < 1e-5, method


def test_negative_weights_negate() -> None:
    tasks = make_tasks(18, M, N, [3, 3])
    neg = [tasks[0], TaskFactors(tasks[1].lora_A, -tasks[1].lora_B)]
    out = run("task_arithmetic", {"m": neg}, MergeOutput(rank=6)).modules["m"]
    assert rel(dense(out), delta(tasks[0]) - delta(tasks[1])) < 1e-5


def test_energy_threshold_picks_the_smallest_rank() -> None:
    g = torch.Generator().manual_seed(19)
    q1 = torch.linalg.qr(torch.randn(M, 4, generator=g, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(N, 4, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64)
    task = TaskFactors(lora_A=q2.mT.float(), lora_B=(q1 * s).float())
    energy = (s.square().cumsum(0) / s.square().sum()).tolist()
    for threshold, expected in ((0.5, 1), (energy[1] - 1e-4, 2), (energy[1] + 1e-4, 3), (1.0, 4)):
        for method in ("task_arithmetic", "merge_then_compress"):
            out = run(method, {"m": [task]}, MergeOutput(energy=threshold)).modules["m"]
            assert out.rank == expected, (method, threshold)


def test_rank_pattern_by_suffix() -> None:
    modules = {
        "layers.0.q_proj": make_tasks(20, M, N, [4, 4]),
        "layers.0.v_proj": make_tasks(21, M, N, [4, 4]),
    }
    res = run("merge_then_compress", modules, MergeOutput(rank_pattern={"q_proj": 2}))
    assert res.modules["layers.0.q_proj"].rank == 2
    assert res.modules["layers.0.v_proj"].rank == 4
    assert res.report["summary"]["output_rank"] == {"layers.0.q_proj": 2, "layers.0.v_proj": 4}


def test_modules_of_different_shapes_and_ranks_batch_correctly() -> None:
    modules = {
        "a": make_tasks(22, 10, 7, [2, 3]),
        "b": make_tasks(23, 30, 12, [2, 3]),
        "c": make_tasks(24, 10, 7, [4, 1]),
    }
    res = run("task_arithmetic", modules, MergeOutput(rank=3))
    for name, tasks in modules.items():
        assert rel(dense(res.modules[name]), best_rank(sum(delta(f) for f in tasks), 3)) < 1e-5


def test_mtc_params_rule_space_full_equals_full_space_ties() -> None:
    tasks = make_tasks(25, 8, 6, [2, 2])
    a = merge_modules(
        "merge_then_compress",
        {"m": tasks},
        MergeThenCompressParams(rule="ties", space="full", density=0.5),
        MergeOutput(rank=2),
    ).modules["m"]
    b = merge_modules("ties", {"m": tasks}, TiesParams(space="full", density=0.5), MergeOutput(rank=2)).modules["m"]
    assert rel(dense(a), dense(b)) < 1e-6


def test_ctm_on_a_short_module_uses_unequal_tucker_ranks() -> None:
    # m = 2 < n: the column stack has rank 2, the row stack rank 6; r = 4 gives Tucker ranks (2, 4)
    tasks = make_tasks(26, 2, 9, [2, 2, 2])
    for isotropize in (False, True):
        out = merge_modules(
            "ctm", {"m": tasks}, CtmParams(isotropize=isotropize, rule="ties", density=0.5), MergeOutput(rank=4)
        ).modules["m"]
        assert out.rank <= 2 and torch.isfinite(dense(out)).all()
    exact = run("ctm", {"m": tasks}, MergeOutput(rank=6)).modules["m"]
    assert rel(dense(exact), sum(delta(f) for f in tasks)) < 1e-5


def test_ctm_energy_threshold_and_knots_rank_pattern() -> None:
    tasks = make_tasks(27, M, N, [3, 3])
    full = run("ctm", {"m": tasks}, MergeOutput(energy=1.0)).modules["m"]
    assert rel(dense(full), sum(delta(f) for f in tasks)) < 1e-5
    small = run("ctm", {"m": tasks}, MergeOutput(energy=0.3)).modules["m"]
    assert 1 <= small.rank < full.rank
    modules = {"l.q_proj": make_tasks(28, M, N, [3, 3]), "l.v_proj": make_tasks(29, M, N, [3, 3])}
    res = run("knots", modules, MergeOutput(rank_pattern={"v_proj": 1}))
    assert res.modules["l.v_proj"].rank == 1 and res.modules["l.q_proj"].rank == 3
