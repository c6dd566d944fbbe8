"""The merge contract: one `<Method>Params` model per merge method, and the output rank spec.

The API validates a merge job with these models at the door; the worker validates the stored spec again
with the same classes before any compute. Every field is bounded and unknown keys are refused.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.checks.peft_patterns import PeftPattern

MAX_RANK = 1024

MergeRule = Literal[
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "tsv", "iso_c", "iso_cts"
]
MergeSpace = Literal["full", "core"]
SPECTRAL_RULES = frozenset({"tsv", "iso_c", "iso_cts"})


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    lambda_: float = Field(
        1.0, alias="lambda", ge=-10.0, le=10.0, description="Global scale applied to the merged update."
    )
    allow_base_mismatch: bool = Field(
        False, description="Merge adapters whose configs name different base models (same shapes only)."
    )
    # a method that reads a base model and calibration rows (the job's `calibration` block) says so here
    calibrated: ClassVar[bool] = False


class _Sparsified(_Params):
    density: float = Field(0.2, ge=0.0, le=1.0, description="Fraction of entries each task keeps, in [0, 1].")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for the random (DARE) pruning.")


class _SignElected(BaseModel):
    majority_sign: Literal["total", "frequency"] = Field(
        "total", description="Sign election: sign of the summed values, or of the summed signs."
    )


class _Spaced(BaseModel):
    space: MergeSpace = Field(
        "core", description="`full`: dense reference on m×n; `core`: lossless Tr×Tr core space."
    )
    isotropize: bool = Field(False, description="Replace the output's singular values by their mean (Iso-C).")


class _CommonSpace(BaseModel):
    common_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="Iso-CTS: share of the output rank given to the common subspace."
    )


class CatParams(_Params):
    """`cat`: stack the factors; exact, output rank Σr."""


class TaskArithmeticParams(_Params, _Spaced):
    """`task_arithmetic`: Σ w_t·s_t·B_t·A_t, exactly; truncated to the output rank on the core."""


class TiesParams(_Sparsified, _SignElected, _Spaced):
    """`ties`: trim to top-density per task, elect the sign, disjoint mean."""


class DareLinearParams(_Sparsified, _Spaced):
    """`dare_linear`: keep each entry with probability density, rescale by 1/density, sum."""


class DareTiesParams(_Sparsified, _SignElected, _Spaced):
    """`dare_ties`: DARE pruning, then TIES sign election and disjoint mean."""


class MagnitudePruneParams(_Sparsified, _Spaced):
    """`magnitude_prune`: keep the top-density entries by magnitude per task, sum."""


class TsvParams(_Params, _Spaced):
    """`tsv`: Task Singular Vectors — each task's top ⌊rank/T⌋ singular triplets, orthogonalised together."""


class IsoCParams(_Params, _Spaced):
    """`iso_c`: the sum's top-rank singular directions with their singular values replaced by their mean."""


class IsoCtsParams(_Params, _Spaced, _CommonSpace):
    """`iso_cts`: common directions of the sum plus each task's own directions, orthogonalised, isotropic."""


class BreadcrumbsParams(_Sparsified, _Spaced):
    """`breadcrumbs`: drop the largest `gamma` and the smallest entries, keeping `density` per task."""

    gamma: float = Field(0.01, ge=0.0, le=1.0, description="Fraction of the largest entries dropped.")

    @model_validator(mode="after")
    def _fits(self) -> BreadcrumbsParams:
        if self.gamma + self.density > 1.0:
            raise ValueError("gamma + density must be at most 1")
        return self


class _RuleParams(_Sparsified, _SignElected, _CommonSpace):
    rule: MergeRule = Field("task_arithmetic", description="The merge rule applied in the method's space.")
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="Breadcrumbs: fraction of largest entries dropped.")

    @model_validator(mode="after")
    def _fits(self) -> _RuleParams:
        if self.rule == "breadcrumbs" and self.gamma + self.density > 1.0:
            raise ValueError("gamma + density must be at most 1")
        return self


class MergeThenCompressParams(_RuleParams, _Spaced):
    """`merge_then_compress`: any rule, then the exact rank-r truncation computed on the Tr×Tr core."""


class KnotsParams(_RuleParams):
    """`knots`: SVD alignment of the stacked updates, merge the per-task blocks of ΣVᵀ (KnOTS).

    Spectral rules are refused: KnOTS' shared U is orthonormal, so a spectral rule on the blocks ΣV_tᵀ gives
    exactly the core-space result (use `merge_then_compress` with space `core`)."""

    isotropize: bool = Field(False, description="Replace the output's singular values by their mean (Iso-C).")

    @model_validator(mode="after")
    def _entrywise_rule(self) -> KnotsParams:
        if self.rule in SPECTRAL_RULES:
            raise ValueError(
                f"rule {self.rule!r} in KnOTS space equals the core-space merge (U is orthonormal): "
                "use merge_then_compress with space 'core'"
            )
        return self


class CtmParams(_RuleParams):
    """`ctm`: Compress-then-Merge — shared rank-r Tucker-2 subspaces of the cores, merge coordinates."""

    beta: float = Field(0.5, ge=0.0, le=1.0, description="Norm balancing for the subspace choice (1 = none).")
    isotropize: bool = Field(False, description="Replace the merged core's singular values by their mean.")
    balanced: bool = Field(True, description="Split the merged core's singular values across both factors.")
    max_iter: int = Field(100, ge=1, le=1000, description="HOOI iteration cap.")


class RainParams(_Params):
    """`rain`: RAIN-Merging — project the instruction update off the reasoning model's features at the thinking
    markers (stage 1), then scale each module by instruction-attention coefficients (stage 2). Needs the job's
    `calibration` block (base model, reasoning rows, optional instruction rows, markers)."""

    calibrated: ClassVar[bool] = True

    preserve: Literal["features", "code"] = Field(
        "features",
        description="`features`: strict null space of the module inputs at the markers (ΔW'x = 0 there); "
        "`code`: the released code's relaxed constraints (attention logits, random readouts) near the markers.",
    )
    radius: int | None = Field(
        None, ge=0, le=16, description="Positions kept around each marker (None: 0 for features, 5 for code)."
    )
    pairs: int = Field(8, ge=1, le=64, description="code: query/key pairs per reasoning row.")
    positions: int = Field(4, ge=1, le=64, description="code: positions per row for V/O/MLP readouts.")
    readouts: int = Field(2, ge=1, le=16, description="code: random readout directions per layer and module.")
    ridge: float = Field(1e-4, ge=0.0, le=1.0, description="code: ridge, relative to the constraints' mean Gram.")
    coefficients: bool = Field(True, description="Stage 2: scale modules by instruction-attention coefficients.")
    rho: float = Field(0.5, ge=0.0, le=10.0, description="Weight of the unrelated-attention change.")
    lambda_h: float = Field(1.0, ge=0.0, le=100.0, description="Per-row curvature of the coefficient QP.")
    mu: float = Field(1.0, ge=0.0, le=100.0, description="Curvature from the unrelated attention after the merge.")
    lambda_2: float = Field(0.1, ge=0.0, le=100.0, description="Pull towards alpha_0.")
    alpha_0: float = Field(1.0, ge=0.0, le=10.0, description="The coefficient without evidence.")
    alpha_min: float = Field(0.0, ge=0.0, le=10.0, description="Lower bound of each coefficient.")
    alpha_max: float = Field(1.5, ge=0.0, le=10.0, description="Upper bound of each coefficient.")
    max_rows: int = Field(1000, ge=1, le=10_000, description="Rows read from each calibration dataset.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the pair/position draws and readouts.")

    @model_validator(mode="after")
    def _box(self) -> RainParams:
        if self.alpha_min > self.alpha_max:
            raise ValueError("alpha_min must be at most alpha_max")
        return self

    def neighbourhood(self) -> int:
        """The radius in effect: given, else 0 (the marker tokens) for features and 5 (the code's) for code."""
        if self.radius is not None:
            return self.radius
        return 0 if self.preserve == "features" else 5


MERGE_PARAMS: dict[str, type[_Params]] = {
    "cat": CatParams,
    "task_arithmetic": TaskArithmeticParams,
    "ties": TiesParams,
    "dare_linear": DareLinearParams,
    "dare_ties": DareTiesParams,
    "magnitude_prune": MagnitudePruneParams,
    "breadcrumbs": BreadcrumbsParams,
    "tsv": TsvParams,
    "iso_c": IsoCParams,
    "iso_cts": IsoCtsParams,
    "merge_then_compress": MergeThenCompressParams,
    "knots": KnotsParams,
    "ctm": CtmParams,
    "rain": RainParams,
}

MergeMethod = Literal[
    "cat",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "breadcrumbs",
    "tsv",
    "iso_c",
    "iso_cts",
    "merge_then_compress",
    "knots",
    "ctm",
    "rain",
]


class MergeOutput(BaseModel):
    """The merged adapter's name and rank: one of `rank`, `rank_pattern` or `energy` (or none: max input r)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("merged", min_length=1, max_length=128, description="A label; never used as a path.")
    rank: int | None = Field(None, ge=1, le=MAX_RANK, description="Output rank for every module.")
    rank_pattern: dict[str, int] | None = Field(
        None,
        max_length=4096,
        description="Per-module output rank, keyed by module name, a dotted suffix of it, or a regular expression "
        "matching a dotted suffix (PEFT's rank_pattern rule: the first matching key applies).",
    )
    energy: float | None = Field(
        None, gt=0.0, le=1.0, description="Smallest rank per module keeping this fraction of the energy."
    )

    @model_validator(mode="after")
    def _one_rank_rule(self) -> MergeOutput:
        given = [x for x in (self.rank, self.rank_pattern, self.energy) if x is not None]
        if len(given) > 1:
            raise ValueError("give at most one of rank, rank_pattern, energy")
        for key, value in (self.rank_pattern or {}).items():
            if not key or len(key) > 512:
                raise ValueError("rank_pattern keys must be 1..512 characters")
            if not 1 <= value <= MAX_RANK:
                raise ValueError(f"rank_pattern[{key!r}] must be in 1..{MAX_RANK}")
        PeftPattern.compile(self.rank_pattern, "rank_pattern")  # a key that is not a regex: PatternError
        return self


MAX_TUNE_POINTS = 64
_ID = r"^[a-z]{2,4}_[0-9a-f]{16,40}$"


class MergeCalibration(BaseModel):
    """What a calibrated method (`rain`) reads besides the adapters: the base model (a causal LM with a
    tokenizer), reasoning rows with one start and one end marker each, optional instruction rows
    (prompt = the instruction, completion = the response) and the two marker tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=_ID, description="A model id of this tenant: the reasoning model (the base).")
    reasoning: str = Field(pattern=_ID, description="A dataset id (lm rows) with the thinking markers.")
    instruction: str | None = Field(
        None, pattern=_ID, description="A dataset id (prompt+completion rows) for the stage-2 coefficients."
    )
    markers: tuple[str, str] = Field(("<think>", "</think>"), description="The start and end thinking tokens.")

    @model_validator(mode="after")
    def _markers(self) -> MergeCalibration:
        start, end = self.markers
        if not start or not end or len(start) > 64 or len(end) > 64:
            raise ValueError("markers are 1..64 characters each")
        if start == end:
            raise ValueError("the start and end markers must differ")
        return self


class TuneValidation(BaseModel):
    """One task's validation rows: the adapter (its 0-based position in `adapters`) and a dataset id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: int = Field(ge=0, le=63, description="Position of the task's adapter in the job's `adapters`.")
    dataset: str = Field(pattern=_ID, description="A dataset id of this tenant: the task's validation rows.")


class TuneSearch(BaseModel):
    """The grid: values per axis (each bounded as the method's own parameter); at most 64 points in all."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    lambda_: list[float] | None = Field(None, alias="lambda", min_length=1, max_length=64)
    density: list[float] | None = Field(None, min_length=1, max_length=64)
    beta: list[float] | None = Field(None, min_length=1, max_length=64)

    def axes(self) -> dict[str, list[float]]:
        """The given axes by their params names (`lambda`, `density`, `beta`)."""
        given = {"lambda": self.lambda_, "density": self.density, "beta": self.beta}
        return {key: values for key, values in given.items() if values}

    @model_validator(mode="after")
    def _bounded(self) -> TuneSearch:
        axes = self.axes()
        if not axes:
            raise ValueError("search needs at least one of lambda, density, beta")
        points = 1
        for key, values in axes.items():
            if len(set(values)) != len(values):
                raise ValueError(f"search.{key} repeats a value")
            points *= len(values)
        if points > MAX_TUNE_POINTS:
            raise ValueError(f"the grid has {points} points; at most {MAX_TUNE_POINTS}")
        return self


class MergeTune(BaseModel):
    """Tune the merge on validation data: merge at every grid point, evaluate on each task's rows with the
    registered base model (classifiers: accuracy; causal LMs: mean answer NLL), normalise by the task's own
    adapter, keep the best point by the mean (or worst-task) normalised score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=_ID, description="A model id of this tenant: the adapters' base model.")
    validation: list[TuneValidation] = Field(min_length=1, max_length=64)
    search: TuneSearch
    objective: Literal["mean", "worst"] = "mean"

    @model_validator(mode="after")
    def _one_dataset_per_task(self) -> MergeTune:
        tasks = [item.adapter for item in self.validation]
        if len(set(tasks)) != len(tasks):
            raise ValueError("validation names an adapter twice")
        return self

    def points(self) -> list[dict[str, float]]:
        """Every grid point as a params update, in the order lambda, density, beta."""
        axes = self.search.axes()
        points: list[dict[str, float]] = [{}]
        for key, values in axes.items():
            points = [{**point, key: value} for point in points for value in values]
        return points

    def check_against(self, params_model: type[BaseModel], params: dict, adapters: int) -> None:
        """Refuse (ValueError) an axis the method does not have, a point its params model rejects, or a
        validation adapter outside the job's adapters."""
        for item in self.validation:
            if item.adapter >= adapters:
                raise ValueError(f"validation adapter {item.adapter} is not one of the {adapters} adapters")
        fields = set(params_model.model_fields) | {"lambda"}
        for key in self.search.axes():
            if key not in fields:
                raise ValueError(f"search.{key}: the method has no parameter {key!r}")
        for point in self.points():
            params_model.model_validate({**params, **point})

