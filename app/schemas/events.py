"""`GET /v1/jobs/{id}/events`: a job's event log (queued, started, stage changes, warnings, the end)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.schemas.jobs import JobState


class JobEventPublic(BaseModel):
    id: str = Field(description="Increasing within the job; send the last one seen as Last-Event-ID to resume.")
    time: datetime
    state: JobState
    progress: float
    stage: str


class EventPage(BaseModel):
    items: list[JobEventPublic]
    state: JobState = Field(description="The job's state now; the log is complete once it is final.")
