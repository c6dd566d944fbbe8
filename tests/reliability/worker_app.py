"""The real worker for reliability tests, with one test hook: a merge whose output name starts with
`slow` first reports progress in small steps for a few seconds (a window in which to break things), and one
named `poison` kills the process running it, every time. Everything else is the production code path."""

from __future__ import annotations

import os
import time

import workers.tasks  # noqa: F401 - registers the task
from workers.celery_app import celery_app
from workers.jobs import run
from workers.jobs.context import JobContext

_real_merge = run.HANDLERS["merge"]


def _merge_with_hooks(context: JobContext):  # noqa: ANN202 - the handler's signature
    name = context.job.spec.get("output", {}).get("name", "")
    if name == "poison":
        os._exit(1)
    if name.startswith("slow"):
        steps = int(os.environ.get("AMEND_TEST_SLOW_STEPS", "25"))
        for step in range(steps):
            context.progress(0.2 * step / steps, "slow test step")
            time.sleep(0.2)
    return _real_merge.run(context)


run.HANDLERS["merge"] = run.JobType(_merge_with_hooks, _real_merge.existing_result)
app = celery_app
