"""The compression contract: one `<Method>Params` model per compression method, and the output's size rule.

A compression job shrinks one adapter (`rank_reduce`, `cast`, `sparsify_quantize`) or extracts a LoRA from a
base model and its full fine-tune (`extract`). The API validates a job with these models at the door; the
worker validates the stored spec again with the same classes before any compute. Every field is bounded and
unknown keys are refused. Pydantic only: no torch here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.checks.peft_patterns import PeftPattern

MAX_RANK = 1024
MAX_BUDGET_PARAMS = 10**12
# the compact form of a sparsify_quantize output, stored beside its PEFT files (GET ...?format=compact)
COMPACT_FILE = "adapter_model.compact.safetensors"

CompressMethod = Literal["rank_reduce", "cast", "sparsify_quantize", "extract"]
# the methods that read one input adapter; `extract` reads two registered models instead
ADAPTER_METHODS: frozenset[str] = frozenset({"rank_reduce", "cast", "sparsify_quantize"})
# the output size rules each method takes (at most one per job)
SIZE_RULES: dict[str, frozenset[str]] = {
    "rank_reduce": frozenset({"rank", "rank_pattern", "energy", "budget_params", "budget_bytes"}),
    "extract": frozenset({"rank", "rank_pattern", "energy"}),
    "cast": frozenset(),
    "sparsify_quantize": frozenset(),
}


class _CompressParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _AdapterParams(_CompressParams):
    forgetting_tolerance: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="When the input adapter came from an unlearning job: the fraction of that job's change of "
        "the forget metric the compressed adapter may lose and still count as `forgetting_preserved`.",
    )


class RankReduceParams(_AdapterParams):
    """`rank_reduce`: the exact truncated SVD of each module's s·B·A from its factors (QR of B and Aᵀ, SVD of
    the r×r core; never m×n), to the output's rank, rank_pattern, energy or parameter/byte budget."""


class CastParams(_AdapterParams):
    """`cast`: the factors down-cast to bf16 or fp16; the relative error of every module is reported."""

    dtype: Literal["bf16", "fp16"] = Field("bf16", description="Target float type of the factors.")


class SparsifyQuantizeParams(_AdapterParams):
    """`sparsify_quantize` (ComPEFT): keep the top `density` of each factor's entries by magnitude, quantize the
    survivors (ternary: sign × one scale per tensor; int8: per-row scales)."""

    # defaults: int8 of every entry (rel_error ~0.006, about a quarter of fp32's bytes). Sparsifying LoRA factors
    # one by one costs fast: on a rank-16 module density 0.5 gave 0.43-0.56, 0.1 (ComPEFT's value for full
    # task vectors) 0.94 — a near-useless default, which it was until the README walk-through measured it
    density: float = Field(1.0, gt=0.0, le=1.0, description="Fraction of each factor's entries kept, in (0, 1].")
    bits: Literal["ternary", "int8"] = Field("int8", description="How the kept entries are quantized.")


ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]{1,128}$")]


class ExtractParams(_CompressParams):
    """`extract`: a LoRA from `model − base_model`, per module, by a randomized range finder with power
    iterations (Halko, Martinsson & Tropp, 2011) on the weight difference streamed from the two models."""

    target_modules: Literal["all-linear"] | list[ModuleName] = Field(
        "all-linear",
        description="'all-linear' (every linear layer but the output head), or module names or suffixes "
        "('q_proj'); 'lm_head' and embeddings are extracted only when named.",
    )
    oversample: int = Field(16, ge=0, le=256, description="Extra sketch columns beyond the rank.")
    power_iterations: int = Field(2, ge=0, le=16, description="Subspace (power) iterations of the range finder.")
    min_relative_change: float = Field(
        1e-6,
        ge=0.0,
        le=1.0,
        description="Modules with ‖W_ft − W_base‖_F ≤ this × ‖W_base‖_F are skipped and listed.",
    )
    max_rank: int = Field(256, ge=1, le=MAX_RANK, description="Cap on any module's rank (with `energy`).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the random sketch.")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 64:
            raise ValueError("target_modules lists 1 to 64 module names")
        return value


COMPRESS_PARAMS: dict[str, type[_CompressParams]] = {
    "rank_reduce": RankReduceParams,
    "cast": CastParams,
    "sparsify_quantize": SparsifyQuantizeParams,
    "extract": ExtractParams,
}


class CompressOutput(BaseModel):
    """The output's name and size rule: at most one of `rank`, `rank_pattern`, `energy`, `budget_params`,
    `budget_bytes` (which ones a method takes: `SIZE_RULES`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("compressed", min_length=1, max_length=128, description="A label; never used as a path.")
    rank: int | None = Field(None, ge=1, le=MAX_RANK, description="Output rank of every module (at most its own).")
    rank_pattern: dict[str, int] | None = Field(
        None,
        max_length=4096,
        description="Per-module rank, keyed by module name, a dotted suffix or a regular expression (PEFT's "
        "rank_pattern rule: the first matching key applies); other modules keep their rank.",
    )
    energy: float | None = Field(
        None, gt=0.0, le=1.0, description="Per module, the smallest rank keeping this fraction of ‖ΔW‖²_F."
    )
    budget_params: int | None = Field(
        None, ge=1, le=MAX_BUDGET_PARAMS, description="Whole adapter: at most this many factor parameters."
    )
    budget_bytes: int | None = Field(
        None, ge=1, le=MAX_BUDGET_PARAMS * 8, description="Whole adapter: at most this many bytes of factors."
    )

    @model_validator(mode="after")
    def _one_size_rule(self) -> CompressOutput:
        if len(self.given()) > 1:
            raise ValueError("give at most one of rank, rank_pattern, energy, budget_params, budget_bytes")
        for key, value in (self.rank_pattern or {}).items():
            if not key or len(key) > 512:
                raise ValueError("rank_pattern keys must be 1..512 characters")
            if not 1 <= value <= MAX_RANK:
                raise ValueError(f"rank_pattern[{key!r}] must be in 1..{MAX_RANK}")
        PeftPattern.compile(self.rank_pattern, "rank_pattern")  # a key that is not a regex: PatternError
        return self

    def given(self) -> list[str]:
        """The size rules this output sets."""
        return [name for name in sorted(SIZE_RULES["rank_reduce"]) if getattr(self, name) is not None]
