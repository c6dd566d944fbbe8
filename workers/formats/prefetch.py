"""Read ahead on a second thread: the next modules' factors are read and decoded while the engine merges
the current batch, so a file-to-file merge costs about max(read, compute) instead of their sum.

The engine asks for modules in a known order (its batches of same-shaped modules); `Prefetching` reads
them in that order on one I/O thread, keeping at most `ahead` modules waiting. A request out of that order
(a method's second pass, e.g. KnOTS ranking then merging) is read on the spot. Reads never run
concurrently (one lock), so a reader with shared scratch buffers stays correct. A second thread that only
reads and decodes does not fight the merge's OpenMP threads the way a second compute thread would.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class Prefetching(Generic[T]):
    """`read(name)` wrapped with read-ahead in `order`; use as a context manager (the thread stops on exit)."""

    def __init__(self, read: Callable[[str], T], order: Sequence[str], ahead: int) -> None:
        self._read, self._order, self._next = read, list(order), 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, T | None, BaseException | None]] = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._threads = torch.get_num_threads()  # OpenMP's thread count is per thread: the job's, not the default
        self._thread = threading.Thread(target=self._run, name="amend-read-ahead", daemon=True)

    def __enter__(self) -> Prefetching[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a pending put
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        for name in self._order:
            if self._stop.is_set():
                return
            try:
                with self._lock:
                    item: tuple[str, T | None, BaseException | None] = (name, self._read(name), None)
            except BaseException as error:  # handed to the consumer, raised where it asks for this module
                item = (name, None, error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __call__(self, name: str) -> T:
        if self._next < len(self._order) and self._order[self._next] == name:
            self._next += 1
            _, data, error = self._queue.get()
            if error is not None:
                raise error
            return data  # type: ignore[return-value]
        with self._lock:  # out of order: read now
            return self._read(name)
