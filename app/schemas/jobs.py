"""Jobs: one resource discriminated on `type`. A spec is validated here at the door and again, with the
same classes, by the worker before any compute."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from app.schemas.compress import ADAPTER_METHODS, COMPRESS_PARAMS, SIZE_RULES, CompressMethod, CompressOutput
from app.schemas.merge import MERGE_PARAMS, MergeCalibration, MergeMethod, MergeOutput, MergeTune
from app.schemas.unlearn import (
    UNLEARN_PARAMS,
    UnlearnGoal,
    UnlearnMethod,
    UnlearnProbe,
    accepts_learn,
    learning_methods,
)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATES: frozenset[str] = frozenset({"queued", "running"})
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ID_PATTERN = r"^[a-z]{2,4}_[0-9a-f]{16,40}$"


class MergeInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN, description="An adapter id of this tenant.")
    weight: float = Field(1.0, ge=-100.0, le=100.0, description="Per-adapter weight; negative negates a task.")
    version: int | None = Field(None, ge=1, le=1_000_000, description=(
        "Pin a version of the adapter (GET /v1/adapters/{id}/versions); none: its current version."))


def version_pin(field: str) -> Any:
    """A job input's version pin: read that version of the target `field` names instead of its current one."""
    return Field(None, ge=1, le=1_000_000, description=f"Pin a version of `{field}` (GET …/versions); none: current.")


def validated_params(
    params_models: Mapping[str, type[BaseModel]], method: str, params: dict[str, Any]
) -> dict[str, Any]:
    """A job's `params` checked against its method's own `<Method>Params` model: bounded, no unknown keys."""
    if len(params) > 32:
        raise ValueError("too many params")
    return params_models[method].model_validate(params).model_dump(mode="json", by_alias=True)


WEBHOOK_URL: Any = Field(
    None, max_length=2048, pattern=r"^https?://[^\s]+$",
    description="POSTed a signed notice when the job ends (see README, Webhooks); https, or http to hosts the "
    "operator allows.",
)


class MergeJobCreate(BaseModel):
    """`{"type": "merge", "adapters": [...], "method": ..., "params": {...}, "output": {...}}`.

    `params` is validated against the method's own parameters model (see the `*Params` schemas): unknown
    keys and out-of-range values are refused.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["merge"]
    webhook_url: str | None = WEBHOOK_URL
    adapters: list[MergeInput] = Field(min_length=1, max_length=64)
    method: MergeMethod
    params: dict[str, Any] = Field(default_factory=dict)
    output: MergeOutput = Field(default_factory=MergeOutput)
    tune: MergeTune | None = Field(None, description="Tune lambda/density/beta on validation data first.")
    calibration: MergeCalibration | None = Field(
        None, description="The base model and calibration rows a calibrated method (rain) reads."
    )

    @model_validator(mode="after")
    def _params_match_method(self) -> MergeJobCreate:
        self.params = validated_params(MERGE_PARAMS, self.method, self.params)
        calibrated = MERGE_PARAMS[self.method].calibrated
        if calibrated and self.calibration is None:
            raise ValueError(f"method {self.method!r} needs a calibration block (model, reasoning rows, markers)")
        if not calibrated and self.calibration is not None:
            raise ValueError(f"method {self.method!r} takes no calibration block")
        if calibrated and self.tune is not None:
            raise ValueError(f"method {self.method!r} cannot be tuned (its merge needs the calibration rows)")
        if self.tune is not None:
            self.tune.check_against(MERGE_PARAMS[self.method], self.params, len(self.adapters))
        return self

    def input_adapter_ids(self) -> list[str]:
        return [item.id for item in self.adapters]


MAX_FORGET_ROWS = 100_000


class UnlearnForget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(pattern=ID_PATTERN, description="A dataset id of this tenant.")
    rows: list[int] | None = Field(
        None,
        min_length=1,
        max_length=MAX_FORGET_ROWS,
        description="Row ids (0-based) to forget; null forgets every row of the dataset.",
    )

    @field_validator("rows")
    @classmethod
    def _unique_non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(row < 0 for row in value):
            raise ValueError("row ids are non-negative")
        return sorted(set(value))


MAX_LEARN_ROWS = 100_000


class UnlearnLearn(UnlearnForget):
    """Rows a continual learn-and-unlearn job learns while it forgets (`ug_clu`)."""

    rows: list[int] | None = Field(
        None,
        min_length=1,
        max_length=MAX_LEARN_ROWS,
        description="Row ids (0-based) to learn; null learns every row of the dataset.",
    )


class FreshLora(BaseModel):
    """The fresh LoRA that carries the change of an unlearning job with output `adapter` and no input adapter
    (PEFT `LoraConfig`: r, lora_alpha, target_modules; dropout 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(
        32, ge=1, le=4096, description="lora_alpha (scaling alpha/r; 32 at r=8: see the README's unlearning defaults)."
    )
    target_modules: Literal["all-linear"] | list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]{1,128}$")]] = Field(
        "all-linear",
        description="'all-linear', or module names (suffixes such as 'q_proj') the LoRA wraps.",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 64:
            raise ValueError("target_modules lists 1 to 64 module names")
        return value


class UnlearnJobCreate(BaseModel):
    """`{"type": "unlearn", "model": id, "adapter": id | null, "forget": {"dataset": id, "rows": [...] | null},
    "retain": id | null, "eval": id | null, "method": ..., "params": {...}, "output": "adapter" | "weights"}`.

    `params` is validated against the method's `<Method>Params` (app/schemas/unlearn.py). With `adapter`,
    that adapter is trained and the output is a new adapter; with output `adapter` and no adapter, a fresh
    LoRA carries the change (`lora` sets its r, alpha and target modules; default r=8, alpha=32, all-linear);
    output `weights` trains the whole model and registers a new model. `learn` (method `ug_clu` only: continual
    learn-and-unlearn) names rows to learn in the same job, `{"dataset": id, "rows": [...] | null}` like `forget`.

    `goal` sets the goal's guards and the run's budget (app/schemas/unlearn.py `UnlearnGoal`); a job that
    does not meet its goal succeeds with `goal_met: false` and a warning event, or fails with `goal_not_met`
    when `require_goal` is true. `probes` re-measure the forgetting after weight quantization or relearning;
    `reference: "retrain"` also retrains on the retain rows (`reference_params`: its `RetrainParams`) and
    reports the gap to it; `seeds` repeats the run per seed and reports mean ± std (the first seed's output
    is the one stored).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["unlearn"]
    webhook_url: str | None = WEBHOOK_URL
    model: str = Field(pattern=ID_PATTERN, description="A registered model id of this tenant.")
    adapter: str | None = Field(None, pattern=ID_PATTERN, description="An adapter of that model to unlearn.")
    model_version: int | None = version_pin("model")
    adapter_version: int | None = version_pin("adapter")
    forget: UnlearnForget
    learn: UnlearnLearn | None = Field(
        None, description="Rows to learn in the same job (continual learn-and-unlearn; method 'ug_clu' only)."
    )
    retain: str | None = Field(None, pattern=ID_PATTERN, description="A dataset whose behaviour is kept.")
    eval_: str | None = Field(None, alias="eval", pattern=ID_PATTERN, description="Held-out / test dataset.")
    method: UnlearnMethod
    params: dict[str, Any] = Field(default_factory=dict)
    output: Literal["adapter", "weights"] = "adapter"
    lora: FreshLora | None = Field(None, description="The fresh LoRA (output 'adapter' without an adapter).")
    name: str | None = Field(None, min_length=1, max_length=128, description="Name of the output.")
    goal: UnlearnGoal = Field(default_factory=UnlearnGoal, description="The goal's guards and the run's budget.")
    require_goal: bool = Field(False, description="Fail with goal_not_met instead of succeeding with a warning.")
    probes: list[UnlearnProbe] = Field(default_factory=list, max_length=2, description="Robustness probes to run.")
    reference: Literal["retrain"] | None = Field(None, description="Retrain on the retain rows and report the gap.")
    reference_params: dict[str, Any] | None = Field(None, description="The reference retrain's RetrainParams.")
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        None, min_length=1, max_length=5, description="Run once per seed; the report gives mean ± std."
    )
    requests: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(
        default_factory=list, max_length=10_000,
        description="Deletion requests this job honours (set by a schedule); its audit record lists each.",
    )

    @model_validator(mode="after")
    def _params_match_method(self) -> UnlearnJobCreate:
        self.params = validated_params(UNLEARN_PARAMS, self.method, self.params)
        if self.learn is not None and not accepts_learn(self.method):
            raise ValueError(
                f"'learn' rows are taken only by {', '.join(learning_methods())} (continual learn-and-unlearn); "
                f"{self.method} only forgets"
            )
        if self.reference_params is not None:
            if self.reference != "retrain":
                raise ValueError("'reference_params' configures the reference: set 'reference' to 'retrain'")
            self.reference_params = validated_params(UNLEARN_PARAMS, "retrain", self.reference_params)
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        if len(set(self.probes)) != len(self.probes):
            raise ValueError("each probe is listed once")
        if self.adapter is not None and self.output == "weights":
            raise ValueError("unlearning through an adapter yields a new adapter: use output 'adapter'")
        if self.lora is not None and (self.adapter is not None or self.output != "adapter"):
            raise ValueError("'lora' configures the fresh LoRA of output 'adapter' without an input adapter")
        return self

    def input_adapter_ids(self) -> list[str]:
        return [self.adapter] if self.adapter else []

    def dataset_ids(self) -> list[str]:
        learn = self.learn.dataset if self.learn is not None else None
        return [i for i in (self.forget.dataset, learn, self.retain, self.eval_) if i]


class CompressJobCreate(BaseModel):
    """`{"type": "compress", "adapter": id, "method": ..., "params": {...}, "output": {...}}`, or for `extract`
    `{"type": "compress", "method": "extract", "base_model": id, "model": id, "params": {...}, "output": {...}}`.

    `params` is validated against the method's `<Method>Params` (app/schemas/compress.py); `output` takes at
    most one size rule, and only one its method accepts.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["compress"]
    webhook_url: str | None = WEBHOOK_URL
    method: CompressMethod
    adapter: str | None = Field(None, pattern=ID_PATTERN, description="The adapter to compress (not extract).")
    base_model: str | None = Field(None, pattern=ID_PATTERN, description="extract: the base model id.")
    model: str | None = Field(None, pattern=ID_PATTERN, description="extract: the fine-tuned model id.")
    adapter_version: int | None = version_pin("adapter")
    base_model_version: int | None = version_pin("base_model")
    model_version: int | None = version_pin("model")
    params: dict[str, Any] = Field(default_factory=dict)
    output: CompressOutput = Field(default_factory=CompressOutput)

    @model_validator(mode="after")
    def _inputs_match_method(self) -> CompressJobCreate:
        self.params = validated_params(COMPRESS_PARAMS, self.method, self.params)
        if self.method in ADAPTER_METHODS:
            if self.adapter is None or self.base_model is not None or self.model is not None:
                raise ValueError(f"{self.method} takes an 'adapter' (and no base_model or model)")
        elif self.adapter is not None or self.base_model is None or self.model is None:
            raise ValueError("extract takes 'base_model' and 'model' (and no adapter)")
        elif self.base_model == self.model:
            raise ValueError("extract needs two different models: base_model and the fine-tuned model")
        refused = [rule for rule in self.output.given() if rule not in SIZE_RULES[self.method]]
        if refused:
            allowed = ", ".join(sorted(SIZE_RULES[self.method])) or "none"
            raise ValueError(f"{self.method} does not take output.{refused[0]} (its size rules: {allowed})")
        return self

    def input_adapter_ids(self) -> list[str]:
        return [self.adapter] if self.adapter else []

    def input_model_ids(self) -> list[str]:
        return [i for i in (self.base_model, self.model) if i]


# The job union, discriminated on `type`.
JobCreate = Annotated[MergeJobCreate | UnlearnJobCreate | CompressJobCreate, Field(discriminator="type")]
job_create_adapter: TypeAdapter[JobCreate] = TypeAdapter(JobCreate)


class JobError(BaseModel):
    code: str
    message: str


class JobResult(BaseModel):
    adapter_id: str | None = None
    adapter_ids: list[str] = Field(default_factory=list)
    report: dict[str, Any] | None = Field(None, description="A summary; the full report is at report_key.")
    report_key: str | None = None
    model_id: str | None = Field(None, description="Unlearn with output 'weights': the new registered model.")
    audit_key: str | None = Field(None, description="Unlearn: the signed audit record (GET /v1/jobs/{id}/audit).")
    warnings: list[str] = Field(default_factory=list, description="Added to the job's events when it succeeds.")


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
    # the id of the request that submitted the job (X-Request-ID): the worker's log lines for the job carry it
    request_id: str | None = None

    def public(self) -> JobPublic:
        return JobPublic.model_validate(self.model_dump(include=set(JobPublic.model_fields)))

    def input_adapter_ids(self) -> list[str]:
        ids = [item["id"] for item in self.spec.get("adapters", [])]
        if self.type in ("unlearn", "compress") and self.spec.get("adapter"):
            ids.append(self.spec["adapter"])
        return ids

    def input_model_ids(self) -> list[str]:
        if self.type == "compress":
            return [i for i in (self.spec.get("base_model"), self.spec.get("model")) if i]
        return [self.spec["model"]] if self.type == "unlearn" and self.spec.get("model") else []

    def input_dataset_ids(self) -> list[str]:
        if self.type != "unlearn":
            return []
        forget, learn = self.spec.get("forget") or {}, self.spec.get("learn") or {}
        ids = (forget.get("dataset"), learn.get("dataset"), self.spec.get("retain"), self.spec.get("eval"))
        return [i for i in ids if i]
