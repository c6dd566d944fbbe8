"""CtM's HOOI is exact: each half-sweep takes the top-r eigenspace of the mode Gram, as a plain HOOI does."""

from __future__ import annotations

import torch

from app.schemas.merge import CtmParams, MergeOutput
from tests.workers.engines.merge.helpers import core_space, dense, make_tasks, rel
from workers.engines.merge.engine import merge_modules


def plain_ctm(tasks, r: int, beta: float) -> torch.Tensor:
    """CtM with task arithmetic written plainly: balanced cores, HOSVD start, HOOI with full eigh per
    half-sweep, stopped as tensorly's partial_tucker stops with the CtM code's tol=1e-6 (from the third sweep
    on, when the reconstruction error sqrt(|‖X‖² − ‖core‖²|)/‖X‖ moved by less than 1e-6; at most 1000
    sweeps), float64."""
    u, v, cores = core_space(tasks)
    stack = torch.stack(cores)
    norms = stack.flatten(1).norm(dim=1)
    balanced = stack * ((beta * norms + (1 - beta) * norms.mean()) / norms)[:, None, None]

    def top(sym: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(sym)[1][:, -r:]

    p = top((balanced @ balanced.mT).sum(0))
    q = top((balanced.mT @ balanced).sum(0))
    norm_sq = float(balanced.square().sum())
    errors = []
    for iteration in range(1000):
        w = balanced @ q
        p = top((w @ w.mT).sum(0))
        w = balanced.mT @ p
        q = top((w @ w.mT).sum(0))
        core_sq = float((p.mT @ balanced @ q).square().sum())
        errors.append(abs(norm_sq - core_sq) ** 0.5 / norm_sq**0.5)
        if iteration > 1 and abs(errors[-2] - errors[-1]) < 1e-6:
            break
    return (u @ p) @ (p.mT @ stack.sum(0) @ q) @ (v @ q).mT


def test_ctm_agrees_with_a_plain_exact_hooi_in_30_of_30_random_cases() -> None:
    far = []
    for seed in range(30):
        tasks = make_tasks(1000 + seed, 64, 64, [4] * 6)
        expected = plain_ctm(tasks, 4, 0.5)
        out = merge_modules("ctm", {"m": tasks}, CtmParams(beta=0.5, max_iter=1000), MergeOutput(rank=4))
        error = rel(dense(out.modules["m"]), expected)
        if error > 1e-4:
            far.append((seed, error))
    assert far == []
