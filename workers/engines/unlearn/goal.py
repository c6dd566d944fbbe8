"""The goal and guards of an unlearning run (`app.schemas.unlearn.UnlearnGoal`), measured on a model.

A `GoalCheck` is built once per run from the data. It fixes seeded subsets of at most `eval_rows` rows per
split (the checks inside the run) beside the full splits (capped as the report caps them; the final verdict),
works out which kind of forgetting the job asks for, and measures a model against it:

- classifier, class-wise (retain rows given and none carries a forget row's label): the forgotten classes'
  accuracy on the forget rows and on the eval rows of those classes ≤ floor = max(`class_accuracy`, 100/C)
  — a retrained model scores 0 there. The floor replaces "no better than on eval rows of the same classes",
  which at ~0 on both sides would turn on a single image;
- classifier, otherwise (random forgetting): forget accuracy ≤ accuracy on the eval rows of the forget rows'
  classes — the forget rows look like test rows;
- causal LM: forget answer accuracy (token-level) ≤ the held-out (eval) rows', and the Min-K% AUC of forget vs
  held-out rows ≤ 0.5 + 2σ₀, σ₀ = √((n_f + n_h + 1)/(12·n_f·n_h)) the AUC's standard deviation when the two
  sets are alike — the retrain-free stopping rule.

A run that also learns rows (`ug_clu`) adds one condition: the learn rows are learned — their accuracy ≥ the
goal's `learn_accuracy`, or by default ≥ the retain accuracy the run started from − `retain_accuracy_drop` (the
level the model holds on rows it was trained on; 100 − the drop without retain rows). It enters the conditions
as `learn_error` = 100 − learn accuracy ≤ 100 − that target, in points like the others. Forgetting is class-wise
only when neither the retain nor the learn rows carry a forget row's label.

Guards, against the model the run started from: retain accuracy ≥ start − `retain_accuracy_drop` points
(classifiers), retain NLL ≤ start + `retain_nll_rise` nats (language models). Without retain rows there is no
guard to measure, and without the rows a goal needs (eval rows for random forgetting and for language
models) the goal cannot be measured: `GoalCheck.why_not` says which.

`Check.shortfall` is the largest excess over a target, in points (accuracy points; AUC × 100): ≤ 0 exactly
when the goal is met. A goal-driven run keeps the state with the smallest shortfall among those that keep
the guards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.schemas.unlearn import UnlearnGoal
from workers.engines.unlearn.data import ClassifierData, Data, LMData
from workers.engines.unlearn.metrics import MAX_EVAL_ROWS, classifier_outputs, lm_outputs, min_k_auc


@dataclass
class Check:
    """One measurement: `values` (named figures), the conditions' targets, and what they mean."""

    values: dict[str, float]
    conditions: list[tuple[str, float, float]]  # (name, value, target): met when value ≤ target
    guards: list[tuple[str, float, float, str]]  # (name, value, bound, "min" | "max")
    shortfall: float
    goal_met: bool
    guards_ok: bool

    @property
    def deficit(self) -> float:
        """How far the worst guard is broken, in its units (points, nats); ≤ 0 when every guard holds."""
        return max(
            ((bound - value) if kind == "min" else (value - bound) for _, value, bound, kind in self.guards),
            default=0.0,
        )

    @property
    def unmet(self) -> list[str]:
        return [f"{name} {value:.2f} > {target:.2f}" for name, value, target in self.conditions if value > target]

    @property
    def broken(self) -> list[str]:
        out = []
        for name, value, bound, kind in self.guards:
            if (kind == "min" and value < bound) or (kind == "max" and value > bound):
                out.append(f"{name} {value:.3f} {'<' if kind == 'min' else '>'} {bound:.3f}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "values": self.values,
            "targets": {name: target for name, _, target in self.conditions},
            "guards": {name: {"value": value, kind: bound} for name, value, bound, kind in self.guards},
            "shortfall": self.shortfall,
            "goal_met": self.goal_met,
            "guards_ok": self.guards_ok,
        }


def _subset(data: Any, rows: int, seed: int) -> Any:
    if data is None or len(data) <= rows:
        return data
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed), device="cpu")[:rows]
    return data.subset(sorted(picked.tolist()))


def auc_null_sigma(n_members: int, n_others: int) -> float:
    """Standard deviation of the AUC of two alike sets of these sizes (Hanley & McNeil, AUC = 0.5)."""
    return math.sqrt((n_members + n_others + 1) / (12.0 * max(n_members, 1) * max(n_others, 1)))


@dataclass
class _Splits:
    forget: Data | None
    retain: Data | None
    evaluation: Data | None
    learn: Data | None = None


@dataclass
class GoalCheck:
    family: str
    goal: UnlearnGoal
    device: torch.device
    kind: str  # "class-wise" | "random" | "language-model"
    why_not: str | None  # the goal cannot be measured: why
    subsets: _Splits
    full: _Splits
    floor: float = 0.0
    forgotten: list[int] = field(default_factory=list)
    start: dict[str, dict[str, float]] = field(default_factory=dict)  # "subset" | "full" -> guard figures

    @classmethod
    def build(
        cls,
        model: nn.Module,
        family: str,
        forget: Data | None,
        retain: Data | None,
        evaluation: Data | None,
        goal: UnlearnGoal,
        seed: int,
        device: torch.device,
        learn: Data | None = None,
    ) -> GoalCheck:
        why_not: str | None = None
        floor, forgotten = 0.0, []
        if forget is None:
            kind, why_not = "none", "the job has no forget rows"
        elif isinstance(forget, ClassifierData):
            forgotten = sorted(set(forget.labels.tolist()))
            retain_labels = set(retain.labels.tolist()) if isinstance(retain, ClassifierData) else None
            if retain_labels is not None and isinstance(learn, ClassifierData):
                retain_labels |= set(learn.labels.tolist())  # the final model keeps what it learns
            if retain_labels is not None and not retain_labels & set(forgotten):
                kind = "class-wise"
                classes = _num_classes(model, forget, device)
                floor = max(goal.class_accuracy, 100.0 / classes)
                if isinstance(evaluation, ClassifierData):
                    evaluation = _of_classes(evaluation, forgotten)
            else:
                kind = "random"
                if not isinstance(evaluation, ClassifierData):
                    why_not = "random forgetting is measured against eval rows of the same classes; the job has none"
                else:
                    evaluation = _of_classes(evaluation, forgotten)
                    if evaluation is None:
                        why_not = "no eval row carries a label of the forget rows"
        else:
            kind = "language-model"
            if evaluation is None:
                why_not = "a language model's goal is measured against held-out (eval) rows; the job has none"
        seed = seed + 7919  # the subsets do not depend on the training batches' order
        subsets = _Splits(*(_subset(d, goal.eval_rows, seed) for d in (forget, retain, evaluation, learn)))
        full = _Splits(*(_subset(d, MAX_EVAL_ROWS, seed) for d in (forget, retain, evaluation, learn)))
        return cls(family, goal, device, kind, why_not, subsets, full, floor, forgotten)

    @property
    def measurable(self) -> bool:
        return self.why_not is None

    def begin(self, model: nn.Module) -> Check:
        """Measure the starting model: the guards' baselines (on the subsets and on the full splits)."""
        self.start = {"subset": self._figures(model, self.subsets), "full": self._figures(model, self.full)}
        return self.measure(model)

    def measure(self, model: nn.Module, full: bool = False) -> Check:
        figures = self._figures(model, self.full if full else self.subsets)
        start = self.start.get("full" if full else "subset", figures)
        conditions: list[tuple[str, float, float]] = []
        if self.kind == "class-wise":
            conditions.append(("forget_accuracy", figures["forget_accuracy"], self.floor))
            if "eval_accuracy" in figures:
                conditions.append(("eval_accuracy_of_forgotten_classes", figures["eval_accuracy"], self.floor))
        elif self.kind == "random" and "eval_accuracy" in figures:
            conditions.append(("forget_accuracy", figures["forget_accuracy"], figures["eval_accuracy"]))
        elif self.kind == "language-model" and "eval_accuracy" in figures:
            conditions.append(("forget_answer_accuracy", figures["forget_accuracy"], figures["eval_accuracy"]))
            conditions.append(("min_k_auc_x100", 100.0 * figures["min_k_auc"], 100.0 * figures["auc_bound"]))
        if "learn_accuracy" in figures and conditions:
            conditions.append(("learn_error", 100.0 - figures["learn_accuracy"], 100.0 - self.learn_target(start)))
        guards: list[tuple[str, float, float, str]] = []
        if "retain_accuracy" in figures and self.family == "classifier":
            bound = start["retain_accuracy"] - self.goal.retain_accuracy_drop
            guards.append(("retain_accuracy", figures["retain_accuracy"], bound, "min"))
        if "retain_nll" in figures and self.family != "classifier":
            guards.append(("retain_nll", figures["retain_nll"], start["retain_nll"] + self.goal.retain_nll_rise, "max"))
        shortfall = max((value - target for _, value, target in conditions), default=math.inf)
        guards_ok = all((v >= b) if kind == "min" else (v <= b) for _, v, b, kind in guards)
        return Check(figures, conditions, guards, shortfall, self.measurable and shortfall <= 0, guards_ok)

    def learn_target(self, start: dict[str, float]) -> float:
        """The learn rows' accuracy that counts as learned, in %: see the module docstring."""
        if self.goal.learn_accuracy is not None:
            return self.goal.learn_accuracy
        return start.get("retain_accuracy", 100.0) - self.goal.retain_accuracy_drop

    def _figures(self, model: nn.Module, splits: _Splits) -> dict[str, float]:
        was_training = model.training
        try:
            if self.family == "classifier":
                return self._classifier_figures(model, splits)
            return self._lm_figures(model, splits)
        finally:
            model.train(was_training)

    def _classifier_figures(self, model: nn.Module, splits: _Splits) -> dict[str, float]:
        out: dict[str, float] = {}
        named = (("forget", splits.forget), ("retain", splits.retain), ("eval", splits.evaluation))
        for name, data in (*named, ("learn", splits.learn)):
            if isinstance(data, ClassifierData):
                correct = classifier_outputs(model, data, self.device)["correct"]
                out[f"{name}_accuracy"] = 100.0 * float(correct.float().mean())
        return out

    def _lm_figures(self, model: nn.Module, splits: _Splits) -> dict[str, float]:
        out: dict[str, float] = {}
        parts = {}
        for name, data in (("forget", splits.forget), ("retain", splits.retain), ("eval", splits.evaluation)):
            if isinstance(data, LMData):
                parts[name] = lm_outputs(model, data, self.device)
                out[f"{name}_accuracy"] = 100.0 * float(parts[name]["token_accuracy"].mean())
                out[f"{name}_nll"] = float(parts[name]["nll"].mean())
        if "forget" in parts and "eval" in parts:
            out["min_k_auc"] = min_k_auc(parts["forget"]["min_k"], parts["eval"]["min_k"])
            n_f, n_e = len(parts["forget"]["min_k"]), len(parts["eval"]["min_k"])
            out["auc_bound"] = 0.5 + 2.0 * auc_null_sigma(n_f, n_e)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "measurable": self.measurable,
            "why_not": self.why_not,
            "class_floor": self.floor if self.kind == "class-wise" else None,
            "forgotten_classes": self.forgotten if self.kind == "class-wise" else None,
            **({"learn_target": self.learn_target(self.start.get("full", {}))} if self.full.learn is not None else {}),
            "start": self.start,
        }


def _of_classes(data: ClassifierData, classes: list[int]) -> ClassifierData | None:
    wanted = torch.tensor(classes, dtype=data.labels.dtype, device=data.labels.device)
    keep = torch.isin(data.labels, wanted).nonzero().squeeze(1)
    return data.subset(keep.tolist()) if len(keep) else None


@torch.no_grad()
def _num_classes(model: nn.Module, data: ClassifierData, device: torch.device) -> int:
    from workers.engines.unlearn.data import to_device
    from workers.engines.unlearn.losses import classifier_logits

    was_training = model.training
    model.eval()
    try:
        return int(classifier_logits(model, to_device(data.collate([0]), device)).shape[-1])
    finally:
        model.train(was_training)
