"""Parallel work of a merge on one-thread workers side by side, never on OpenMP teams: decompositions of
batches of small matrices (core-space cores, Grams a few hundred wide) split in parts, and per-module work
(Grams, lifts, spectral rules) one module per worker. `pool_only()` runs a merge that way: its own thread's
torch ops on one OpenMP thread, and as many workers as the caller's torch threads.

Why: a worker runs with `OMP_WAIT_POLICY=PASSIVE` (`workers/runtime.py`: threads that spin while waiting
make torch several times slower whenever the cores are shared). MKL's LAPACK opens many short parallel
regions on a 128×128 matrix, and with passive waiting each one wakes the sleeping thread through the
kernel: a batched float64 `eigh` of 32 matrices 128×128 took 228 ms with two threads against 32 ms with
one (measured on this 2-core machine). Split over two one-thread pool workers it took 20 ms on an idle
machine, and 32 ms (the same as one thread) while another process held a core. The merge's remaining ops
(products of a few K×K matrices, TIES' top-k) are small too; on one OpenMP thread beside the pool, `ctm`
at T=8 (8 Llama-7B-shaped layers, files to file) took 2.9 s against 3.4 s with two OpenMP threads and the
same pool, and 3.1 s on one thread without it (one run each, on a shared machine).

Only CPU tensors go through the pool; on other devices the torch call is made as it is.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor

A = TypeVar("A")
R = TypeVar("R")

# below about this many multiply-adds (a batch of a few 32×32 matrices) MKL stays on one thread anyway, and
# a hand-off to the pool would cost more than the decomposition
_DIRECT_FLOPS = 2**17
_PREFIX = "amend-small-linalg"
_state: dict[str, ThreadPoolExecutor | int | None] = {"pool": None, "size": 0}
_lock = threading.Lock()
_local = threading.local()  # `width`: the workers a `pool_only` block of this thread may use


def _one_thread() -> None:
    # torch applies the process-wide thread count to a thread the first time it asks for it (lazily); ask
    # first, then set this thread's count, so a later set_num_threads elsewhere does not reach the worker
    torch.get_num_threads()
    torch.set_num_threads(1)


def _reset_after_fork() -> None:  # a forked child (a prefork worker) has no pool threads: start afresh
    global _lock
    _lock = threading.Lock()
    _state["pool"], _state["size"] = None, 0


os.register_at_fork(after_in_child=_reset_after_fork)


def _pool(size: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _state["pool"]
        if not isinstance(pool, ThreadPoolExecutor) or _state["size"] != size:
            if isinstance(pool, ThreadPoolExecutor):
                pool.shutdown(wait=False)
            pool = ThreadPoolExecutor(size, thread_name_prefix=_PREFIX, initializer=_one_thread)
            _state["pool"], _state["size"] = pool, size
        return pool


def _width() -> int:
    """How many one-thread workers a call may use: the width of the caller's `pool_only` block, else its torch
    threads; 1 inside a worker (work handed to the pool never hands work on)."""
    if threading.current_thread().name.startswith(_PREFIX):
        return 1
    width = getattr(_local, "width", None)
    return int(width) if width else torch.get_num_threads()


@contextmanager
def pool_only(width: int | None = None) -> Iterator[None]:
    """Run the block with its parallelism on the pool only: `width` one-thread workers (default: the caller's
    torch threads), and the caller's own torch ops on one OpenMP thread. Restores both on exit."""
    threads, before = torch.get_num_threads(), getattr(_local, "width", None)
    _local.width = max(1, width if width is not None else _width())  # nested: the enclosing block's width
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _local.width = before


def _split(fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]], x: Tensor) -> Tensor | tuple[Tensor, ...]:
    """`fn(x)` for a batch `x` (…, p, q), computed in parts along the first axis on one-thread workers."""
    threads = _width()
    batch = x.reshape(-1, *x.shape[-2:])
    rows, cols = x.shape[-2:]
    if x.device.type != "cpu" or threads == 1 or batch.shape[0] * rows * cols * min(rows, cols) < _DIRECT_FLOPS:
        return fn(x)
    parts = max(1, min(threads, batch.shape[0]))
    pool = _pool(max(1, threads))
    chunks = torch.tensor_split(batch, parts)
    results = [future.result() for future in [pool.submit(fn, chunk) for chunk in chunks]]
    lead = x.shape[:-2]
    if isinstance(results[0], Tensor):
        joined = torch.cat(results)  # type: ignore[arg-type]
        return joined.reshape(*lead, *joined.shape[1:])
    outputs = []
    for pieces in zip(*results, strict=True):
        joined = torch.cat(pieces)
        outputs.append(joined.reshape(*lead, *joined.shape[1:]))
    return tuple(outputs)


def map_each(fn: Callable[[A], R], items: Sequence[A]) -> list[R]:
    """`[fn(item) for item in items]`, the calls side by side on the pool's one-thread workers (for work
    that is too small to keep the job's threads busy on its own, e.g. one module's Grams or lift)."""
    threads = _width()
    if threads == 1 or len(items) < 2:
        return [fn(item) for item in items]
    pool = _pool(threads)
    return [future.result() for future in [pool.submit(fn, item) for item in items]]


def eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """`torch.linalg.eigh`: (eigenvalues ascending, eigenvectors)."""
    values, vectors = _split(lambda c: tuple(torch.linalg.eigh(c)), x)
    return values, vectors


def eigvalsh(x: Tensor) -> Tensor:
    """`torch.linalg.eigvalsh`: eigenvalues ascending."""
    values = _split(torch.linalg.eigvalsh, x)
    assert isinstance(values, Tensor)
    return values


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`torch.linalg.svd(x, full_matrices=False)`: (U, S, Vᴴ)."""
    u, s, vh = _split(lambda c: tuple(torch.linalg.svd(c, full_matrices=False)), x)
    return u, s, vh


def svdvals(x: Tensor) -> Tensor:
    """`torch.linalg.svdvals`: singular values, descending."""
    values = _split(torch.linalg.svdvals, x)
    assert isinstance(values, Tensor)
    return values
