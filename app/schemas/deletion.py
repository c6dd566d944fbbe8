"""Deletion requests and schedules: rows a customer or a data team wants forgotten, collected until a
schedule honours them in one unlearning job (see README, Deletion requests)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.schemas.jobs import (
    ID_PATTERN,
    MAX_FORGET_ROWS,
    CompressJobCreate,
    FreshLora,
    JobError,
    MergeJobCreate,
    UnlearnJobCreate,
)
from app.schemas.unlearn import UnlearnGoal, UnlearnMethod

RequestState = Literal["pending", "scheduled", "completed", "failed", "cancelled"]
OPEN_REQUEST_STATES = frozenset({"pending", "scheduled"})
PLACEHOLDER_DATASET = "ds_0000000000000000"  # stands in for the forget set while a schedule's spec is checked


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=ID_PATTERN, description="A registered model id of this tenant.")
    adapter: str | None = Field(None, pattern=ID_PATTERN, description="One of its adapters, or null: the model.")

    def key(self) -> str:
        return f"{self.model}/{self.adapter or '-'}"


class TargetVersion(BaseModel):
    version: int
    model_id: str | None = Field(None, description="The model (an adapter's is known once a schedule names it).")
    adapter_id: str | None = None
    parent_version: int | None = Field(None, description="The version this one was unlearned from.")
    job_id: str | None = Field(None, description="The unlearning job that made it (none for version 1).")
    audit_key: str | None = None
    requests: list[str] = Field(default_factory=list, description="The deletion requests it honours.")
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    promoted_at: datetime | None = None
    promotion: str | None = Field(None, description="Why it was or was not promoted.")


class TargetVersionsPublic(BaseModel):
    id: str = Field(description="The target's id (the adapter's, or the model's).")
    kind: Literal["adapter", "model"]
    target: Target
    current: int
    versions: list[TargetVersion]


class TargetVersions(TargetVersionsPublic):
    tenant: str

    def public(self) -> TargetVersionsPublic:
        return TargetVersionsPublic.model_validate(self.model_dump(include=set(TargetVersionsPublic.model_fields)))


class UnlearningRequestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: Target
    dataset: str = Field(pattern=ID_PATTERN, description="The dataset holding the rows.")
    rows: list[int] = Field(min_length=1, max_length=MAX_FORGET_ROWS, description="Row ids (0-based) to forget.")
    reason: str | None = Field(None, max_length=2000)
    requested_by: str | None = Field(None, max_length=256)
    deadline: AwareDatetime | None = Field(None, description="RFC 3339 with a zone: honour before this time.")

    @field_validator("rows")
    @classmethod
    def _unique_non_negative(cls, value: list[int]) -> list[int]:
        if any(row < 0 for row in value):
            raise ValueError("row ids are non-negative")
        return sorted(set(value))


class UnlearningRequestPublic(BaseModel):
    id: str
    state: RequestState
    target: Target
    dataset: str
    rows: list[int]
    reason: str | None = None
    requested_by: str | None = None
    deadline: datetime | None = None
    created_at: datetime
    updated_at: datetime
    schedule_id: str | None = Field(None, description="The schedule whose run took it.")
    job_id: str | None = Field(None, description="The unlearning job that honours it (GET /v1/jobs/{id}).")
    audit_record: str | None = Field(None, description="Its job's audit record: GET /v1/jobs/{job_id}/audit.")
    version: int | None = Field(None, description="The target's version the job produced.")
    stale_descendants: list[str] = Field(
        default_factory=list, description="Adapters/models merged or compressed from the pre-unlearning version."
    )
    rebuild_jobs: dict[str, str] = Field(
        default_factory=dict, description="With rebuild_descendants: each stale descendant's rebuild job."
    )
    rebuild_refused: dict[str, str] = Field(
        default_factory=dict, description="With rebuild_descendants: why a stale descendant was not rebuilt."
    )
    error: JobError | None = None
    at_risk: bool = Field(False, description="Pending, and its deadline falls before its target's next run.")


class UnlearningRequestRecord(UnlearningRequestPublic):
    tenant: str
    content_hash: str
    idempotency_key: str | None = None
    claim: str | None = Field(None, description="The schedule run (idempotency key) that took it.")

    def public(self, at_risk: bool = False) -> UnlearningRequestPublic:
        data = self.model_dump(include=set(UnlearningRequestPublic.model_fields))
        data["at_risk"] = at_risk
        return UnlearningRequestPublic.model_validate(data)


# -- schedules --------------------------------------------------------------------------------------


class Promote(BaseModel):
    """When the new version becomes current: `auto` when the job met its goal and the guards hold, `never`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "never"] = "auto"
    max_retain_accuracy_drop: float | None = Field(
        None, ge=0.0, le=100.0, description="Guard: retain accuracy may fall at most this many points."
    )
    max_retain_nll_rise: float | None = Field(None, ge=0.0, le=100.0, description="Guard: retain NLL rise, nats.")


class UnlearnPendingJob(BaseModel):
    """Gather every pending request for `target` into one forget set and submit one unlearning job."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["unlearn_pending"]
    target: Target
    method: UnlearnMethod
    params: dict[str, Any] = Field(default_factory=dict)
    retain: str | None = Field(None, pattern=ID_PATTERN)
    eval_: str | None = Field(None, alias="eval", pattern=ID_PATTERN)
    output: Literal["adapter", "weights"] = "adapter"
    lora: FreshLora | None = None
    goal: UnlearnGoal = Field(default_factory=UnlearnGoal)
    require_goal: bool = False
    promote: Promote = Field(default_factory=Promote)
    rebuild_descendants: bool = False
    webhook_url: str | None = Field(None, max_length=2048, pattern=r"^https?://[^\s]+$")

    @model_validator(mode="after")
    def _valid_job(self) -> UnlearnPendingJob:
        self.params = self.unlearn_job(PLACEHOLDER_DATASET, [0], []).params
        return self

    def unlearn_job(
        self, dataset: str, rows: list[int], requests: list[str], source: Target | None = None
    ) -> UnlearnJobCreate:
        """The unlearning job, starting from `source` (the target's current version; the target itself when
        None). A version that is an adapter is unlearned through that adapter."""
        source = source or self.target
        return UnlearnJobCreate.model_validate({
            "type": "unlearn", "model": source.model, "adapter": source.adapter,
            "forget": {"dataset": dataset, "rows": rows}, "retain": self.retain, "eval": self.eval_,
            "method": self.method, "params": self.params, "output": "adapter" if source.adapter else self.output,
            "lora": None if source.adapter else self.lora,
            "goal": self.goal, "require_goal": self.require_goal, "webhook_url": self.webhook_url,
            "requests": requests,
        })


ScheduleJob = Annotated[
    MergeJobCreate | UnlearnJobCreate | CompressJobCreate | UnlearnPendingJob, Field(discriminator="type")
]


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (an IANA name such as 'Europe/Berlin')") from None
    return value


class Timing(BaseModel):
    """Exactly one of `cron` (5 fields, in `timezone`), `interval_seconds`, `run_at` (once)."""

    cron: str | None = Field(None, max_length=128, examples=["0 3 * * *"])
    interval_seconds: int | None = Field(None, ge=1, le=366 * 86400)
    run_at: AwareDatetime | None = None
    timezone: str = Field("UTC", max_length=64)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return _zone(value)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from croniter import croniter

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a 5-field cron expression")
        return value

    def check_one(self) -> None:
        given = [n for n in ("cron", "interval_seconds", "run_at") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of cron, interval_seconds, run_at")


class ScheduleCreate(Timing):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    job: ScheduleJob
    paused: bool = False

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleCreate:
        self.check_one()
        return self


class ScheduleUpdate(BaseModel):
    """Pause or resume, rename, or change the timing (a new timing replaces the old one whole)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=128)
    paused: bool | None = None
    cron: str | None = Field(None, max_length=128)
    interval_seconds: int | None = Field(None, ge=1, le=366 * 86400)
    run_at: AwareDatetime | None = None
    timezone: str | None = Field(None, max_length=64)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        return None if value is None else _zone(value)


class ScheduleRun(BaseModel):
    slot: datetime = Field(description="The scheduled time this run is for.")
    time: datetime = Field(description="When it ran.")
    job_id: str | None = None
    skipped: str | None = Field(None, description="Why no job was submitted, e.g. 'nothing pending'.")
    requests: list[str] = Field(default_factory=list)
    error: str | None = None


class SchedulePublic(BaseModel):
    id: str
    name: str
    cron: str | None = None
    interval_seconds: int | None = None
    run_at: datetime | None = None
    timezone: str
    paused: bool
    job: dict[str, Any]
    created_at: datetime
    next_run_at: datetime | None = None
    runs: list[ScheduleRun] = Field(default_factory=list, description="The last runs, newest first.")


class ScheduleRecord(SchedulePublic):
    tenant: str
    anchor: datetime = Field(description="Interval schedules: slots are anchor + k·interval.")

    def public(self) -> SchedulePublic:
        return SchedulePublic.model_validate(self.model_dump(include=set(SchedulePublic.model_fields)))

    def timing(self) -> Timing:
        return Timing(cron=self.cron, interval_seconds=self.interval_seconds, run_at=self.run_at,
                      timezone=self.timezone)
