"""Per-job scratch directories, and the sweep of those a killed worker left behind.

A job's downloaded inputs and its outputs pass through `job_scratch(job_id)`, a temporary directory
removed when the job ends. A worker killed with SIGKILL (out of memory, a node drain) cannot remove it, so
every worker sweeps scratch directories older than `max_age` — at start and on the reaper's timer.
`max_age` is longer than any job may run (twice AMEND_JOB_TIME_LIMIT, after which Celery kills a job), so a
live job of a sibling worker on the same host is never touched.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
PREFIX = "amend-scratch-"


def job_scratch(job_id: str) -> tempfile.TemporaryDirectory[str]:
    """A fresh scratch directory for one attempt of `job_id` (use as a context manager)."""
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{job_id}-")


def sweep(max_age: float, root: Path | None = None) -> list[Path]:
    """Remove scratch directories under `root` (the temp dir) last modified more than `max_age` seconds
    ago; returns those removed."""
    cutoff = time.time() - max_age
    removed = []
    for entry in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            if entry.is_dir() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        except OSError:  # removed meanwhile by another worker
            continue
    if removed:
        log.info("removed stale job scratch directories", extra={"count": len(removed)})
    return removed
