"""The one-thread pool for small decompositions gives torch's own answers, in order, and really splits."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from workers.engines import linalg_pool


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _sym(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x @ x.mT


def test_batched_results_equal_torchs_direct_calls(two_threads):
    sym = _sym(2, 5, 64, 64)  # two leading axes: split on the flattened batch, shaped back
    values, vectors = linalg_pool.eigh(sym)
    ref_values, ref_vectors = torch.linalg.eigh(sym)
    assert values.shape == ref_values.shape and vectors.shape == ref_vectors.shape
    torch.testing.assert_close(values, ref_values)
    # eigenvectors up to sign: compare the projectors of each vector
    torch.testing.assert_close(vectors.abs(), ref_vectors.abs())
    torch.testing.assert_close(linalg_pool.eigvalsh(sym), torch.linalg.eigvalsh(sym))
    x = torch.randn(7, 40, 64, dtype=torch.float64)
    u, s, vh = linalg_pool.svd(x)
    assert u.shape == (7, 40, 40) and s.shape == (7, 40) and vh.shape == (7, 40, 64)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, x)
    torch.testing.assert_close(linalg_pool.svdvals(x), torch.linalg.svdvals(x))


def test_a_single_matrix_keeps_its_shape(two_threads):
    sym = _sym(96, 96)
    values, vectors = linalg_pool.eigh(sym)
    assert values.shape == (96,) and vectors.shape == (96, 96)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.mT, sym)


def test_work_runs_on_one_thread_workers_side_by_side(two_threads):
    seen: list[tuple[str, int]] = []

    def record(i: int) -> int:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return i * i

    assert linalg_pool.map_each(record, list(range(12))) == [i * i for i in range(12)]  # order kept
    assert all(name.startswith("amend-small-linalg") and threads == 1 for name, threads in seen), seen
    assert torch.get_num_threads() == 2  # the caller's threads are left as they were


def test_one_thread_jobs_compute_in_place():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = linalg_pool.map_each(lambda _: threading.current_thread().name, [0, 1])
    finally:
        torch.set_num_threads(before)
    assert names == [threading.current_thread().name] * 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_pool(two_threads):
    """A prefork worker's child inherits the pool object but not its threads: without a fresh pool its
    first hand-off would wait forever. (The child computes nothing on its own OpenMP team: GNU OpenMP is
    not usable in a child forked after the parent ran a parallel region, pool or not.)"""
    both = threading.Barrier(2, timeout=10)  # both pool threads alive in the parent before it forks

    def meet(_: int) -> str:
        both.wait()
        return threading.current_thread().name

    parent_names = set(linalg_pool.map_each(meet, [0, 1]))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            names = linalg_pool.map_each(lambda _: threading.current_thread().ident, [0, 1, 2])
            os.write(write, b"1" if len(names) == 3 and threading.get_ident() not in names else b"0")
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's first hand-off to the pool never finished")
    assert os.read(read, 1) == b"1" and done[1] == 0
    assert len(parent_names) == 2 and all(name.startswith("amend-small-linalg") for name in parent_names)


def test_pool_only_runs_the_caller_on_one_thread_and_the_work_on_the_pool(two_threads):
    names: list[str] = []

    def record(i: int) -> int:
        names.append(threading.current_thread().name)
        return i

    with linalg_pool.pool_only():
        assert torch.get_num_threads() == 1  # the caller's own ops: one OpenMP thread
        with linalg_pool.pool_only():  # nested: still the enclosing block's two workers
            assert linalg_pool.map_each(record, list(range(6))) == list(range(6))
        values = linalg_pool.eigvalsh(_sym(6, 64, 64))  # split across the workers, same answer
    assert torch.get_num_threads() == 2  # restored
    assert names and all(name.startswith("amend-small-linalg") for name in names)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(_sym(6, 64, 64)))
    with linalg_pool.pool_only(width=1):  # a one-worker block computes in place
        assert linalg_pool.map_each(lambda _: threading.current_thread().name, [0, 1]) == [
            threading.current_thread().name
        ] * 2
