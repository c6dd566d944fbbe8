"""Spectral rules (tsv, iso_c, iso_cts) against plain dense references written from the papers' code, in
both spaces; core equals full; isotropize for every rule and space."""

from __future__ import annotations

import pytest
import torch

from app.schemas.merge import MERGE_PARAMS, CtmParams, KnotsParams, MergeOutput
from tests.workers.engines.merge.helpers import core_space, delta, dense, make_tasks, rel
from workers.engines.merge.engine import merge_modules

M, N = 24, 18


def svd(x):
    return torch.linalg.svd(x, full_matrices=False)


def orth(x):
    """Polar factor, as the code writes it: u_u @ v_u of the SVD."""
    u, _, vh = svd(x)
    return u @ vh


def plain_tsv(deltas, rank):
    """compute_and_sum_svd_mem_reduction with ⌊rank/T⌋ triplets per task (tasks have at least that rank)."""
    k = max(1, rank // len(deltas))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = svd(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    return orth(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ orth(torch.cat(vs, 0))


def plain_iso_c(deltas, rank):
    u, s, vh = svd(sum(deltas))
    return u[:, :rank] @ torch.diag(torch.full((rank,), float(s[:rank].mean()), dtype=s.dtype)) @ vh[:rank]


def plain_iso_cts(deltas, rank, fraction):
    """iso_cts of the Iso-merging code with min(shape_) replaced by the output rank."""
    t = len(deltas)
    common = int(rank * fraction)
    specific_total = round((rank - common) / t) * t
    common = rank - specific_total
    u, s, vh = svd(sum(deltas))
    uc, sc, vc = u[:, :common], s[:common], vh[:common]
    per = specific_total // t
    us, ss, vs = [], [], []
    for d in deltas:
        w = d - uc @ uc.T @ d
        ut, st, vt = svd(w)
        us.append(ut[:, :per])
        ss.append(st[:per])
        vs.append(vt[:per])
    uu, vv = orth(torch.cat([*us, uc], 1)), orth(torch.cat([*vs, vc], 0))
    sigma = torch.cat([*ss, sc]).mean()
    return sigma * uu @ vv


def run(method, tasks, rank, **kw):
    """Merge with the method's params from the keywords it has (others are ignored)."""
    model = MERGE_PARAMS[method]
    params = model.model_validate({k: v for k, v in kw.items() if k in set(model.model_fields) | {"lambda"}})
    return merge_modules(method, {"m": tasks}, params, MergeOutput(rank=rank))


CASES = [
    ("tsv", {}, lambda d, r: plain_tsv(d, r)),
    ("iso_c", {}, lambda d, r: plain_iso_c(d, r)),
    ("iso_cts", {"common_fraction": 0.5}, lambda d, r: plain_iso_cts(d, r, 0.5)),
    ("iso_cts", {}, lambda d, r: plain_iso_cts(d, r, 0.8)),
]


@pytest.mark.parametrize(("rule", "kw", "reference"), CASES)
@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize("rank", [4, 8])
def test_spectral_rules_match_plain_references(rule, kw, reference, space, rank) -> None:
    tasks = make_tasks(21, M, N, [3, 3, 2, 4])
    lam = 0.7
    out = run(rule, tasks, rank, space=space, **{"lambda": lam}, **kw).modules["m"]
    expected = lam * reference([delta(f) for f in tasks], rank)
    assert rel(dense(out), expected) < 1e-6, (rule, space)
    assert out.rank <= rank


@pytest.mark.parametrize("rule", ["tsv", "iso_c", "iso_cts"])
def test_core_space_equals_full_space(rule: str) -> None:
    tasks = make_tasks(22, 30, 20, [4, 2, 3])
    for rank in (3, 6, 9):
        core = run(rule, tasks, rank, space="core", common_fraction=0.4).modules["m"]
        full = run(rule, tasks, rank, space="full", common_fraction=0.4).modules["m"]
        assert rel(dense(core), dense(full)) < 1e-6, (rule, rank)


def test_tsv_at_rank_sum_is_the_core_space_codes_result() -> None:
    """The Core Space code runs TSV on the Tr×Tr cores with k = ⌊Tr/T⌋ = r triplets per task."""
    tasks = make_tasks(23, M, N, [3, 3, 3])
    u_ref, v_ref, cores = core_space(tasks)
    expected = u_ref @ plain_tsv(cores, 9) @ v_ref.T
    assert rel(dense(run("tsv", tasks, 9).modules["m"]), expected) < 1e-6


@pytest.mark.parametrize("rule", ["tsv", "iso_c", "iso_cts"])
def test_one_adapter_and_rank_bounds(rule: str) -> None:
    (task,) = make_tasks(24, M, N, [5])
    out = run(rule, [task], 3).modules["m"]
    u, s, vh = svd(delta(task))
    top = s[:3].mean() if rule != "tsv" else None
    expected = (u[:, :3] * (s[:3] if top is None else top)) @ vh[:3]
    assert rel(dense(out), expected) < 1e-6
    assert out.rank == 3


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.5}),
        ("tsv", {}),
        ("merge_then_compress", {"rule": "dare_linear", "density": 0.7}),
    ],
)
@pytest.mark.parametrize("space", ["core", "full"])
def test_isotropize_flattens_every_rule_in_both_spaces(method, kw, space) -> None:
    tasks = make_tasks(25, M, N, [3, 2, 3])
    plain = dense(run(method, tasks, 4, space=space, **kw).modules["m"])
    flat = dense(run(method, tasks, 4, space=space, isotropize=True, **kw).modules["m"])
    u, s, vh = svd(plain)
    k = int((s > s[0] * 1e-6).sum())
    assert rel(flat, (u[:, :k] * s[:k].mean()) @ vh[:k]) < 1e-6


def test_knots_isotropize_and_refuses_spectral_rules() -> None:
    tasks = make_tasks(26, M, N, [3, 2])
    plain = dense(merge_modules("knots", {"m": tasks}, KnotsParams(), MergeOutput(rank=3)).modules["m"])
    flat = dense(merge_modules("knots", {"m": tasks}, KnotsParams(isotropize=True), MergeOutput(rank=3)).modules["m"])
    u, s, vh = svd(plain)
    assert rel(flat, (u[:, :3] * s[:3].mean()) @ vh[:3]) < 1e-6
    with pytest.raises(ValueError, match="core"):
        KnotsParams(rule="tsv")


@pytest.mark.parametrize("rule", ["tsv", "iso_c", "iso_cts"])
def test_ctm_with_a_spectral_rule_stays_within_rank(rule: str) -> None:
    tasks = make_tasks(27, M, N, [4, 4, 4])
    res = merge_modules("ctm", {"m": tasks}, CtmParams(rule=rule, common_fraction=0.5), MergeOutput(rank=4))
    out = res.modules["m"]
    assert out.rank <= 4 and torch.isfinite(dense(out)).all()
    assert dense(out).norm() > 0
