"""Job scratch directories: removed when the job ends, swept when a killed worker left them behind."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from workers.upkeep import scratch


def test_job_scratch_is_removed_when_the_job_ends() -> None:
    with scratch.job_scratch("jb_0123456789abcdef") as path:
        directory = Path(path)
        assert directory.name.startswith(f"{scratch.PREFIX}jb_0123456789abcdef-")
        assert directory.parent == Path(tempfile.gettempdir())
        (directory / "inputs").mkdir()
    assert not directory.exists()


def test_sweep_removes_only_old_scratch_directories(tmp_path: Path) -> None:
    old = tmp_path / f"{scratch.PREFIX}jb_dead-abc"
    (old / "inputs").mkdir(parents=True)
    (old / "inputs" / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    live = tmp_path / f"{scratch.PREFIX}jb_live-def"
    live.mkdir()
    other = tmp_path / "someone-elses-dir"
    other.mkdir()
    hours_ago = time.time() - 3 * 3600
    for path in (old, other):
        os.utime(path, (hours_ago, hours_ago))
    assert scratch.sweep(2 * 3600, root=tmp_path) == [old]
    assert not old.exists() and live.exists() and other.exists()
    assert scratch.sweep(2 * 3600, root=tmp_path) == []
