"""Jobs: one resource discriminated on `type`. A spec is validated here at the door and again, with the
same classes, by the worker before any compute."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from app.schemas.merge import MERGE_PARAMS, MergeMethod, MergeOutput

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATES: frozenset[str] = frozenset({"queued", "running"})
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ID_PATTERN = r"^[a-z]{2,4}_[0-9a-f]{16,40}$"


class MergeInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN, description="An adapter id of this tenant.")
    weight: float = Field(1.0, ge=-100.0, le=100.0, description="Per-adapter weight; negative negates a task.")


class MergeJobCreate(BaseModel):
    """`{"type": "merge", "adapters": [...], "method": ..., "params": {...}, "output": {...}}`.

    `params` is validated against the method's own parameters model (see the `*Params` schemas): unknown
    keys and out-of-range values are refused.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["merge"]
    adapters: list[MergeInput] = Field(min_length=1, max_length=64)
    method: MergeMethod
    params: dict[str, Any] = Field(default_factory=dict)
    output: MergeOutput = Field(default_factory=MergeOutput)

    @field_validator("params")
    @classmethod
    def _bounded_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > 32:
            raise ValueError("too many params")
        return value

    @model_validator(mode="after")
    def _params_match_method(self) -> MergeJobCreate:
        params_model = MERGE_PARAMS[self.method]
        self.params = params_model.model_validate(self.params).model_dump(by_alias=True)
        return self

    def input_adapter_ids(self) -> list[str]:
        return [item.id for item in self.adapters]


# The job union, discriminated on `type`; each later job type (unlearn, compress) joins it here.
JobCreate = MergeJobCreate
job_create_adapter: TypeAdapter[JobCreate] = TypeAdapter(JobCreate)


class JobError(BaseModel):
    code: str
    message: str


class JobResult(BaseModel):
    adapter_id: str | None = None
    adapter_ids: list[str] = Field(default_factory=list)
    report: dict[str, Any] | None = Field(None, description="A summary; the full report is at report_key.")
    report_key: str | None = None


class JobEvent(BaseModel):
    time: datetime
    state: JobState
    progress: float
    stage: str


class JobPublic(BaseModel):
    id: str
    type: str
    method: str
    state: JobState
    progress: float = Field(ge=0.0, le=1.0)
    stage: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    spec: dict[str, Any]
    result: JobResult | None = None
    error: JobError | None = None


class JobRecord(JobPublic):
    tenant: str
    idempotency_key: str | None = None
    request_hash: str | None = None
    cancel_requested: bool = False
    events: list[JobEvent] = Field(default_factory=list)

    def public(self) -> JobPublic:
        return JobPublic.model_validate(self.model_dump(include=set(JobPublic.model_fields)))

    def input_adapter_ids(self) -> list[str]:
        return [item["id"] for item in self.spec.get("adapters", [])]
