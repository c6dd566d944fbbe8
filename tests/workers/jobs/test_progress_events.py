"""Progress ticks reach the job's event log (with their numbers and fraction), throttled: each tenth of the
way or every EVENT_TICK_SECONDS; the live progress key is still updated on every call."""

from __future__ import annotations

from types import SimpleNamespace

from app.jobs import lifecycle
from app.records import Records, new_id, now
from app.schemas.jobs import JobRecord
from app.settings import Settings
from workers.jobs import context as context_module
from workers.jobs.context import JobContext


def test_progress_ticks_become_events(redis_url, redis_client, moto_s3, monkeypatch):
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit")
    records = Records.connect(settings)
    records.storage.ensure_bucket()
    record = JobRecord(id=new_id("jb"), tenant="t", type="merge", method="ctm", state="queued", progress=0.0,
                       stage="queued", created_at=now(), spec={})
    lifecycle.create(records, record)
    job = lifecycle.start(records, record.id, max_attempts=3)
    ctx = JobContext(job, records, settings, SimpleNamespace(lost=False))  # type: ignore[arg-type]
    clock = [1000.0]
    monkeypatch.setattr(context_module.time, "monotonic", lambda: clock[0])
    for fraction, stage in ((0.02, "module 1/50"), (0.06, "module 3/50"), (0.13, "step 13/100, loss 2.31"),
                            (0.18, "step 18/100, loss 2.05")):
        ctx.progress(fraction, stage)
        clock[0] += 1
    clock[0] += 31  # quiet for longer than EVENT_TICK_SECONDS
    ctx.progress(0.19, "step 19/100, loss 2.01")
    events = records.get_job(record.id).events
    ticks = [(e.stage, e.progress) for e in events if e.stage.startswith("progress")]
    assert ticks == [("progress 2%: module 1/50", 0.02), ("progress 13%: step 13/100, loss 2.31", 0.13),
                     ("progress 19%: step 19/100, loss 2.01", 0.19)]
    live = records.get_job(record.id)
    assert live.state == "running" and live.stage == "step 19/100, loss 2.01"
