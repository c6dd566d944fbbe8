"""The unlearning contract: one `<Method>Params` model per method, and what each method needs.

The API validates an unlearning job with these models at the door and refuses, at submission, a job that
lacks an input its method needs (`missing_inputs`) or targets a model family the method does not support
(`UNLEARN_FAMILIES`). The worker validates the stored spec again with the same classes before any compute.
Every field is bounded and unknown keys are refused. Pydantic only: no torch here.

Inputs a method may need (`UNLEARN_REQUIREMENTS`):
- `forget`: the rows to forget;
- `retain`: rows whose behaviour must be kept (also needed by any method run with `gu=True`);
- `reference_model`: the worker keeps a frozen copy of the input model (θ0) beside the one it trains —
  twice the memory; it is not a separate upload;
- `template`: a template answer (e.g. "I don't know.") taken from the params' `template` field;
- `learn`: rows to learn in the same job (the job's `learn`); only methods that declare it accept them
  (`accepts_learn`) — a continual learn-and-unlearn job (`ug_clu`).

The formulas, defaults and their sources are in `research/unlearning-methods.md`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelFamily = Literal["causal_lm", "classifier"]
UnlearnInput = Literal["forget", "retain", "reference_model", "template", "learn"]

MAX_STEPS = 10_000
MAX_LAYER = 255


class _UnlearnParams(BaseModel):
    """The training knobs every method shares (the shared loop reads them)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    lr: float | None = Field(
        None, gt=0.0, le=1.0, description="Learning rate; null: chosen by a short learning-rate range test."
    )
    steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Optimiser steps, run in full; null: goal-driven (stop once the job's goal is met).",
    )
    batch_size: int = Field(32, ge=1, le=1024, description="Rows per forget batch and per retain batch.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds batch order, random labels and vectors.")
    max_grad_norm: float = Field(1.0, gt=0.0, le=1e4, description="Gradient-norm clipping per step.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with momentum 0.9.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled (AdamW) or L2 (SGD) decay.")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="Learning-rate schedule.")


class _Gradient(BaseModel):
    """Options of methods that follow a forget-loss gradient."""

    gu: bool = Field(
        False,
        description="Project the forget gradient off the span of per-sample retain gradients (GU); needs retain rows.",
    )
    gu_retain_samples: int = Field(
        8,
        ge=1,
        le=16,
        description="Rows of each step's retain batch whose per-sample gradients span the GU subspace.",
    )


class _Weighted(BaseModel):
    """L = gamma·L_forget + alpha·L_retain."""

    alpha: float = Field(1.0, ge=0.0, le=1e3, description="Weight of the retain loss.")
    gamma: float = Field(1.0, ge=0.0, le=1e3, description="Weight of the forget loss.")


def _template() -> str:
    return Field("I don't know.", min_length=1, max_length=512, description="Answer taught for forget prompts.")


# -- both families ------------------------------------------------------------------------------------------


class GradAscentParams(_UnlearnParams, _Gradient):
    """`grad_ascent`: ascend the task loss on the forget set (L = −loss(D_f)); a baseline that collapses."""


class RetrainParams(_UnlearnParams):
    """`retrain`: re-initialise (a LoRA adapter: fresh init) and train on retain only — the gold standard."""

    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Learning rate.")
    steps: int = Field(500, ge=1, le=MAX_STEPS, description="Optimiser steps.")
    reinitialize: bool = Field(True, description="Start from fresh initial weights (False: from input).")


# -- language models ----------------------------------------------------------------------------------------


class GradDiffParams(_UnlearnParams, _Gradient, _Weighted):
    """`grad_diff`: L = −γ·NLL(D_f) + α·NLL(D_r)."""


class NpoParams(_UnlearnParams, _Gradient, _Weighted):
    """`npo`: L_f = −(2/β)·mean log σ(β·(NLL_θ − NLL_θ0)) on forget answers (summed over tokens)."""

    beta: float = Field(0.1, gt=0.0, le=100.0, description="Inverse temperature β.")


class SimnpoParams(_UnlearnParams, _Gradient, _Weighted):
    """`simnpo`: L_f = −(2/β)·mean log σ(β·(NLL_θ/|y| − δ)); no reference model."""

    beta: float = Field(4.5, gt=0.0, le=100.0, description="Inverse temperature β.")
    delta: float = Field(0.0, ge=-100.0, le=100.0, description="Margin δ on the length-normalised NLL.")
    gamma: float = Field(0.125, ge=0.0, le=1e3, description="Weight of the forget loss.")


class IdkParams(_UnlearnParams, _Gradient, _Weighted):
    """`idk`: DPO with the template answer as the winner and the true answer as the loser (IdkDPO)."""

    beta: float = Field(0.1, gt=0.0, le=100.0, description="DPO inverse temperature β.")
    template: str = _template()


# "I don't know" answers a template is drawn from per row (our wording; TOFU's `data/idontknow.jsonl` and
# FLAT draw from a list of 100 such variants)
IDK_TEMPLATES: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I don't have that information.",
    "I can't answer that.",
    "That is not something I know.",
    "I have no idea.",
    "I'm unable to say.",
    "I do not know the answer to that.",
)

FlatDivergence = Literal["total_variation", "kl", "jensen_shannon", "pearson"]


class FlatParams(_UnlearnParams, _Gradient):
    """`flat`: L = −g(P̄_e) + f*(P̄_f) on mean answer-token probabilities (FLAT); forget rows and templates only.

    Total Variation by default (−½·tanh(P̄_e) + ½·tanh(P̄_f)); KL, Jensen–Shannon and Pearson as options.
    """

    divergence: FlatDivergence = Field("total_variation", description="The f-divergence of the variational form.")
    templates: tuple[Annotated[str, Field(min_length=1, max_length=512)], ...] = Field(
        IDK_TEMPLATES, min_length=1, max_length=128, description="Template answers; one is drawn per row and step."
    )
    template: str | None = Field(
        None, min_length=1, max_length=512, description="A single template answer (replaces `templates`)."
    )


class RmuParams(_UnlearnParams, _Gradient):
    """`rmu`: steer layer-`layer` activations of forget text to c·u, keep retain activations at θ0's."""

    layer: int = Field(
        1,
        ge=0,
        le=MAX_LAYER,
        description="Decoder layer whose output is steered; use an inner one (the last is read after the final norm).",
    )
    steering_coeff: float = Field(6.5, gt=0.0, le=1e4, description="Norm c of the random steering vector.")
    alpha: float = Field(100.0, ge=0.0, le=1e5, description="Weight of the retain activation MSE.")
    trained_layers: tuple[int, ...] | None = Field(
        None,
        max_length=64,
        description="Decoder layers whose parameters are trained; default: layer−2 … layer.",
    )
    trained_module: str = Field(
        "mlp",
        max_length=128,
        pattern=r"^[A-Za-z0-9_.]*$",
        description="Only parameters whose name contains this (after `layers.<i>.`) are trained; '' = all.",
    )

    @model_validator(mode="after")
    def _layers_bounded(self) -> RmuParams:
        for index in self.trained_layers or ():
            if not 0 <= index <= MAX_LAYER:
                raise ValueError(f"trained_layers entries must be in 0..{MAX_LAYER}")
        return self


# -- classifiers --------------------------------------------------------------------------------------------


class FinetuneParams(_UnlearnParams):
    """`finetune`: keep training on retain only (catastrophic forgetting of D_f)."""


class RandomLabelParams(_UnlearnParams, _Gradient, _Weighted):
    """`random_label`: a pass of CE steps toward random wrong labels on D_f, then a pass of CE steps on D_r."""

    max_grad_norm: float = Field(1e4, gt=0.0, le=1e4, description="Gradient-norm clipping (the reference has none).")


class SalunParams(RandomLabelParams):
    """`salun`: random labelling restricted to the top-q weight saliency of the forget loss (SalUn)."""

    q: float = Field(0.5, gt=0.0, le=1.0, description="Fraction of coordinates the saliency mask keeps.")


class SsdParams(_UnlearnParams):
    """`ssd`: selective synaptic dampening — no training; scales weights specialised to D_f down."""

    alpha: float | None = Field(
        None,
        gt=0.0,
        le=1e6,
        description="Selection: I_f > α·I_D. Null: goal-driven — the largest α of a ladder from 10 down to 1.2 whose "
        "dampening meets the goal keeping the guards (10, the paper's, when the goal cannot be measured).",
    )
    lambda_: float = Field(1.0, alias="lambda", gt=0.0, le=1e6, description="Dampening: ×min(λ·I_D/I_f, 1).")
    importance_on: Literal["retain", "retain_and_forget"] = Field(
        "retain_and_forget",
        description="Data behind I_D. With the forget rows included, I_f/I_D ≤ |D|/|D_f|: α must stay below.",
    )


class SfronParams(_UnlearnParams, _Gradient):
    """`sfron`: SFR-on fast–slow loop — a retain step every iteration, a masked AdaGA forget step every k.

    `steps` is the number of iterations T (goal-driven: the α schedule spans the driver's GOAL_HORIZON).
    """

    optimizer: Literal["adamw", "sgd"] = Field("sgd", description="AdamW, or SGD with momentum 0.9.")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="L2 (SGD) or decoupled (AdamW) decay.")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="Learning-rate schedule.")
    k: int = Field(5, ge=1, le=1000, description="A forget (slow) step every k iterations.")
    alpha0: float = Field(25.0, ge=0.0, le=1e4, description="Initial forget-loss weight, cosine-decayed.")
    gamma: float = Field(1.0, ge=0.0, le=1e12, description="Mask threshold on (F_f + ε)/(F_r + ε).")
    ada_lambda: float = Field(0.5, ge=0.0, le=10.0, description="AdaGA weights w_i ∝ ℓ_i^(−λ).")
    forget_clip: float = Field(7.0, gt=0.0, le=1e4, description="Gradient-norm clip of the forget step.")


class L1SparseParams(_UnlearnParams):
    """`l1_sparse`: fine-tune on retain with an L1 penalty α_t·‖θ‖₁, α_t decaying linearly to 0."""

    l1: float = Field(5e-5, ge=0.0, le=1.0, description="Initial L1 coefficient α.")


class NatmuParams(_UnlearnParams):
    """`natmu`: natural unlearning — fine-tune (CE, no ascent) on retain rows plus hybrids of each forget image
    with retain images of other classes, labelled with those classes (He et al., 2024). Image classifiers only."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW (the reference), or SGD with momentum.")
    weight_decay: float = Field(2e-3, ge=0.0, le=1.0, description="Decoupled (AdamW) or L2 (SGD) decay.")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="Learning-rate schedule.")
    batch_size: int = Field(128, ge=1, le=1024, description="Rows per batch (hybrids and retain rows).")
    delta: float = Field(-0.19, ge=-1.0, le=1.0, description="Shift δ of the masks: M ← clip(M + δ, 0, 1).")
    targets: int = Field(4, ge=1, le=4, description="Hybrids per forget image (one per mask M1–M4).")
    rebalance: bool = Field(True, description="Spread over-used target classes over under-used ones.")


class MuMisParams(_UnlearnParams):
    """`mu_mis`: minimise the gap between the target-class and the other classes' input sensitivities
    ‖∇ₓz_k(x)‖ on the forget rows, by double backpropagation; no retain rows (Cheng et al., 2024)."""

    optimizer: Literal["adamw", "sgd"] = Field("sgd", description="SGD with momentum 0.9, or AdamW.")
    other_classes: int | None = Field(
        None, ge=1, le=1024, description="Irrelevant classes sampled per batch; null: all of them."
    )


class MusoParams(_UnlearnParams):
    """`muso`: alternate relabelling the forget rows by kernel ridge regression of retain labels on the
    penultimate features, and fine-tuning on retain rows plus the relabelled forget rows (Yang et al., 2024)."""

    optimizer: Literal["adamw", "sgd"] = Field("sgd", description="SGD with momentum 0.9, or AdamW.")
    relabel_every: int = Field(50, ge=1, le=MAX_STEPS, description="Steps between two relabellings.")
    relabel_rows: int = Field(
        2000, ge=1, le=20_000, description="Class-balanced retain rows the kernel regression is fit on (m)."
    )
    ridge: float = Field(1e-3, ge=0.0, le=1e3, description="λ = ridge·tr(K)/m added to the retain Gram matrix.")
    target_loss: Literal["soft_ce", "mse"] = Field(
        "soft_ce", description="Relabelled rows: CE to the clipped, normalised relabels, or MSE of the logits."
    )


class UgCluParams(SfronParams):
    """`ug_clu`: continual learn-and-unlearn (Huang et al., 2025) — SFR-on's fast–slow loop whose slow step also
    descends on the job's learn rows, under one mask balanced between the forget and the learn rows."""

    learn_weight: float = Field(
        1.0, ge=0.0, le=1e3, description="Weight p_L of the learn rows' mean CE in each slow step."
    )


UNLEARN_PARAMS: dict[str, type[_UnlearnParams]] = {
    "grad_ascent": GradAscentParams,
    "retrain": RetrainParams,
    "grad_diff": GradDiffParams,
    "npo": NpoParams,
    "simnpo": SimnpoParams,
    "idk": IdkParams,
    "flat": FlatParams,
    "rmu": RmuParams,
    "finetune": FinetuneParams,
    "random_label": RandomLabelParams,
    "salun": SalunParams,
    "ssd": SsdParams,
    "sfron": SfronParams,
    "l1_sparse": L1SparseParams,
    "natmu": NatmuParams,
    "mu_mis": MuMisParams,
    "muso": MusoParams,
    "ug_clu": UgCluParams,
}

UNLEARN_REQUIREMENTS: dict[str, frozenset[str]] = {
    "grad_ascent": frozenset({"forget"}),
    "retrain": frozenset({"retain"}),
    "grad_diff": frozenset({"forget", "retain"}),
    "npo": frozenset({"forget", "retain", "reference_model"}),
    "simnpo": frozenset({"forget", "retain"}),
    "idk": frozenset({"forget", "retain", "reference_model", "template"}),
    "flat": frozenset({"forget", "template"}),
    "rmu": frozenset({"forget", "retain", "reference_model"}),
    "finetune": frozenset({"retain"}),
    "random_label": frozenset({"forget", "retain"}),
    "salun": frozenset({"forget", "retain"}),
    "ssd": frozenset({"forget", "retain"}),
    "sfron": frozenset({"forget", "retain"}),
    "l1_sparse": frozenset({"retain"}),
    "natmu": frozenset({"forget", "retain"}),
    "mu_mis": frozenset({"forget"}),
    "muso": frozenset({"forget", "retain"}),
    "ug_clu": frozenset({"forget", "retain", "learn"}),
}

_BOTH: frozenset[str] = frozenset({"causal_lm", "classifier"})
_LM: frozenset[str] = frozenset({"causal_lm"})
_CLS: frozenset[str] = frozenset({"classifier"})

UNLEARN_FAMILIES: dict[str, frozenset[str]] = {
    "grad_ascent": _BOTH,
    "retrain": _BOTH,
    "grad_diff": _LM,
    "npo": _LM,
    "simnpo": _LM,
    "idk": _LM,
    "flat": _LM,
    "rmu": _LM,
    "finetune": _CLS,
    "random_label": _CLS,
    "salun": _CLS,
    "ssd": _CLS,
    "sfron": _CLS,
    "l1_sparse": _CLS,
    "natmu": _CLS,
    "mu_mis": _CLS,
    "muso": _CLS,
    "ug_clu": _CLS,
}

UnlearnMethod = Literal[
    "grad_ascent",
    "retrain",
    "grad_diff",
    "npo",
    "simnpo",
    "idk",
    "flat",
    "rmu",
    "finetune",
    "random_label",
    "salun",
    "ssd",
    "sfron",
    "l1_sparse",
    "natmu",
    "mu_mis",
    "muso",
    "ug_clu",
]


# -- the job's goal, guards, probes and reference --------------------------------------------------------------

UnlearnProbe = Literal["quantize", "relearn"]


class UnlearnGoal(BaseModel):
    """The goal and guards of an unlearning job, and the budget of a goal-driven run.

    Goal (fixed): the forget rows look like rows the model never saw — classifiers: forget accuracy at or below
    the accuracy on eval rows of the same classes; class-wise forgetting (no retain row carries a forget label):
    the forgotten classes' accuracy, on the forget rows and on the eval rows of those classes, at or below
    max(`class_accuracy`, chance). Language models: forget answer accuracy at or below the held-out (eval)
    rows', and the Min-K% membership AUC of forget vs held-out rows indistinguishable from 0.5.
    Guards: retain accuracy (classifiers) or retain NLL (language models) stays near its start.
    A job that also learns rows (`ug_clu`) adds a condition: the learn rows are learned — their accuracy at or
    above `learn_accuracy`, or, when that is null, the retain accuracy the run started from minus
    `retain_accuracy_drop` (the level the model holds on the rows it was trained on).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    class_accuracy: float = Field(
        10.0,
        ge=0.0,
        le=100.0,
        description="Class-wise forgetting: forgotten classes' accuracy at or below max(this, chance), in %.",
    )
    retain_accuracy_drop: float = Field(
        2.0, ge=0.0, le=100.0, description="Guard (classifiers): retain accuracy falls at most this many points."
    )
    retain_nll_rise: float = Field(
        0.1, ge=0.0, le=100.0, description="Guard (language models): retain NLL rises at most this many nats."
    )
    learn_accuracy: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="Jobs with learn rows: their accuracy must reach this (%); null: start retain accuracy − drop.",
    )
    eval_rows: int = Field(256, ge=8, le=10_000, description="Rows per split in the seeded subsets checked in a run.")
    check_every: int = Field(10, ge=1, le=1000, description="Steps between two checks of the goal and guards.")
    max_steps: int = Field(
        2000, ge=1, le=MAX_STEPS, description="Step budget of a goal-driven run (learning-rate search included)."
    )
    max_seconds: float = Field(600.0, gt=0.0, le=86_400.0, description="Time budget of a goal-driven run.")
    repair_steps: int = Field(
        0, ge=0, le=1000, description="Goal-driven: once the goal is met, up to this many steps on the retain term "
        "alone, kept only while the goal still holds (the retain damage the run took is repaired; 0: stop at once).",
    )


def required_inputs(method: str, params: BaseModel | None = None) -> frozenset[str]:
    """What `method` needs with these params: its declared inputs, plus `retain` when `gu` is on."""
    needed = set(UNLEARN_REQUIREMENTS[method])
    if params is not None and getattr(params, "gu", False):
        needed.add("retain")
    return frozenset(needed)


def accepts_learn(method: str) -> bool:
    """Whether `method` takes learn rows (it declares the `learn` input); other methods refuse them."""
    return "learn" in UNLEARN_REQUIREMENTS[method]


def learning_methods() -> list[str]:
    return sorted(name for name in UNLEARN_REQUIREMENTS if accepts_learn(name))


def missing_inputs(method: str, params: BaseModel | None, provided: set[str] | frozenset[str]) -> list[str]:
    """The inputs a job lacks, sorted; `template` and `reference_model` are supplied by params and worker."""
    supplied = set(provided) | {"template", "reference_model"}
    return sorted(required_inputs(method, params) - supplied)
