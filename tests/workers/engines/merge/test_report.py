"""The report measures what it names: compression error against the same rule uncompressed, deviation from
the sum, a basis-independent sign conflict, energy kept as a fraction, effective rank — against dense
computations written here."""

from __future__ import annotations

import math

import pytest
import torch

from app.schemas.merge import MERGE_PARAMS, MergeOutput
from tests.workers.engines.merge.helpers import core_space, delta, dense, make_tasks, plain_ties, rel
from workers.engines.merge.engine import merge_modules
from workers.engines.merge.types import TaskFactors

M, N = 20, 16


def run(method, tasks, rank=3, **kw):
    model = MERGE_PARAMS[method]
    params = model.model_validate({k: v for k, v in kw.items() if k in set(model.model_fields) | {"lambda"}})
    return merge_modules(method, {"m": tasks}, params, MergeOutput(rank=rank))


def dense_conflict(d: torch.Tensor, out: torch.Tensor) -> float:
    """Share of ΔW_t's energy on its singular directions along which the output is negative."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = int((s > s[0] * 1e-6).sum())
    along = torch.stack([u[:, i] @ out @ vh[i] for i in range(k)])
    return float(s[:k][along < 0].square().sum() / s[:k].square().sum())


def effective_rank(x: torch.Tensor) -> float:
    s = torch.linalg.svdvals(x)
    s = s[s > s[0] * 1e-6]
    p = s / s.sum()
    return math.exp(float(-(p * p.log()).sum()))


def test_mtc_ties_compression_error_is_against_uncompressed_core_ties() -> None:
    tasks = make_tasks(31, M, N, [3, 3, 2])
    lam = 0.9
    res = run("ties", tasks, rank=2, density=0.4, **{"lambda": lam})
    u, v, cores = core_space(tasks)
    flat = torch.stack([c.flatten() for c in cores])
    uncompressed = lam * u @ plain_ties(flat, 0.4).reshape(cores[0].shape) @ v.T
    out = dense(res.modules["m"])
    rep = res.report["modules"]["m"]
    assert rep["compression_error"] == pytest.approx(float((out - uncompressed).norm() / uncompressed.norm()), abs=1e-6)
    total = lam * sum(delta(f) for f in tasks)
    assert rep["deviation_from_sum"] == pytest.approx(float((out - total).norm() / total.norm()), abs=1e-6)
    assert rep["output_norm"] == pytest.approx(float(out.norm()), rel=1e-6)
    kept = res.report["summary"]["output_norm_fraction_total"]
    assert kept == pytest.approx(float(out.norm() / total.norm()), rel=1e-6)
    # at full rank nothing is compressed, but TIES still deviates from the sum
    full = run("ties", tasks, rank=8, density=0.4).report["modules"]["m"]
    assert full["compression_error"] < 1e-6 and full["deviation_from_sum"] > 0.1


@pytest.mark.parametrize("rule", ["task_arithmetic", "ties", "tsv"])
def test_ctm_compression_error_is_against_the_rules_core_space_merge(rule: str) -> None:
    tasks = make_tasks(32, M, N, [3, 3, 3])
    res = run("ctm", tasks, rank=3, rule=rule, density=0.5)
    reference = run("merge_then_compress", tasks, rank=9, rule=rule, density=0.5)  # rank Σr: uncompressed
    assert reference.report["modules"]["m"]["compression_error"] < 1e-6
    expected = rel(dense(res.modules["m"]), dense(reference.modules["m"]))
    assert res.report["modules"]["m"]["compression_error"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("method", "kw"),
    [("task_arithmetic", {}), ("ties", {"density": 0.5}), ("ties", {"density": 0.5, "space": "full"}),
     ("iso_c", {}), ("ctm", {"rule": "ties"}), ("knots", {"rule": "ties", "density": 0.5}), ("cat", {})],
)
def test_sign_conflict_energy_fraction_and_effective_rank_match_dense(method: str, kw: dict) -> None:
    tasks = make_tasks(33, M, N, [2, 3, 2])
    res = run(method, tasks, rank=3, **kw)
    out = dense(res.modules["m"])
    rep = res.report["modules"]["m"]
    u, s, vh = torch.linalg.svd(out, full_matrices=False)
    k = int((s > s[0] * 1e-6).sum())
    for t, f in enumerate(tasks):
        d = delta(f)
        assert rep["tasks"][t]["sign_conflict"] == pytest.approx(dense_conflict(d, out), abs=1e-6)
        kept = float((u[:, :k].T @ d @ vh[:k].T).square().sum() / d.square().sum())
        assert rep["tasks"][t]["energy_kept_fraction"] == pytest.approx(kept, abs=1e-6)
    assert rep["effective_rank"] == pytest.approx(effective_rank(out), rel=1e-6)
    summary = res.report["summary"]
    assert summary["compression_error_total"] is not None and summary["deviation_from_sum_total"] is not None


def test_sign_conflict_does_not_change_when_the_basis_is_rotated() -> None:
    """Reparametrise each task's factors (B_t G_t, G_t⁻¹ A_t) and rotate the weight space (O_m ΔW_t O_n):
    the core bases change, the sign conflict of every rule and space does not (it follows the maps)."""
    tasks = make_tasks(34, M, N, [3, 2, 3])
    g = torch.Generator().manual_seed(5)
    o_m = torch.linalg.qr(torch.randn(M, M, generator=g))[0]
    o_n = torch.linalg.qr(torch.randn(N, N, generator=g))[0]
    moved = []
    for f in tasks:
        mix = torch.randn(f.rank, f.rank, generator=g) + 3 * torch.eye(f.rank)
        moved.append(TaskFactors(lora_A=torch.linalg.solve(mix, f.lora_A) @ o_n, lora_B=o_m @ f.lora_B @ mix))
    for method, kw in [("task_arithmetic", {}), ("task_arithmetic", {"space": "full"}), ("tsv", {}), ("ctm", {})]:
        a = run(method, tasks, **kw).report["modules"]["m"]["tasks"]
        b = run(method, moved, **kw).report["modules"]["m"]["tasks"]
        for t in range(3):
            assert a[t]["sign_conflict"] == pytest.approx(b[t]["sign_conflict"], abs=1e-6), method
    core = run("task_arithmetic", tasks).report["modules"]["m"]["tasks"]
    full = run("task_arithmetic", tasks, space="full").report["modules"]["m"]["tasks"]
    assert [t["sign_conflict"] for t in core] == pytest.approx([t["sign_conflict"] for t in full], abs=1e-6)
