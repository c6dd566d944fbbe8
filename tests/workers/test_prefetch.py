"""Read-ahead for file-to-file merges: in-order requests come from the I/O thread, others are read on the
spot, an error surfaces where its module is asked for, and reads never overlap."""

from __future__ import annotations

import threading
import time

import pytest

from workers.formats.prefetch import Prefetching


def test_read_ahead_in_order_out_of_order_and_errors() -> None:
    active, overlap, threads = [0], [False], set()

    def read(name: str) -> str:
        active[0] += 1
        overlap[0] |= active[0] > 1
        threads.add(threading.current_thread().name)
        time.sleep(0.005)
        active[0] -= 1
        if name == "bad":
            raise ValueError("bad module")
        return name.upper()

    with Prefetching(read, ["a", "b", "c", "bad"], ahead=2) as loader:
        assert loader("a") == "A"
        assert loader("x") == "X"  # out of order: read now, while the thread keeps its place
        assert [loader("b"), loader("c")] == ["B", "C"]
        with pytest.raises(ValueError, match="bad module"):
            loader("bad")
        assert loader("a") == "A"  # a second pass reads on the spot
    assert not overlap[0]
    assert "amend-read-ahead" in threads


def test_exit_stops_a_thread_blocked_on_a_full_queue() -> None:
    with Prefetching(lambda name: name, [str(i) for i in range(100)], ahead=1) as loader:
        assert loader("0") == "0"
    assert not loader._thread.is_alive()
