"""The entry point the job pipeline calls: `unlearn(...)` -> `UnlearnOutcome(model, report)`.

    outcome = unlearn(model, "causal_lm", "npo", NpoParams(...), forget, retain, evaluation,
                      tokenizer=tokenizer, progress=lambda f, stage: ..., should_cancel=lambda: False)

- `model`: a transformers model (or any `nn.Module` classifier), or a peft `PeftModel` — then only the
  parameters peft left trainable (the LoRA factors, plus `modules_to_save`) change, and the caller saves
  the new adapter with `outcome.model.save_pretrained(dir)`. The model is updated in place and returned.
- `forget`, `retain`, `evaluation`: for a causal LM `LMData.from_jsonl(jsonl_bytes, tokenizer)` (or
  `LMData.from_rows(rows, tokenizer)`; rows `{"prompt","completion"}` or `{"text"}`), for a classifier
  `ClassifierData.from_safetensors(file_bytes)` (or `.from_tensors(dict)`; `pixel_values` or
  `input_ids`(+`attention_mask`), and `labels`). `evaluation` is the test set
  (classifier: TA and MIA) or held-out rows (causal LM: Min-K% AUC); it is never trained on.
- `learn`: rows to learn in the same run (`ClassifierData`), for a method that declares the `learn` input
  (`ug_clu`); the report's before/after then carry `learn_accuracy` and `learn_loss`, and the goal adds "the
  learn rows are learned" (`goal.py`). Other methods refuse learn rows.
- `params`: the method's `<Method>Params` (from `app.schemas.unlearn`) or a plain dict; validated again.
- `goal`: the job's `UnlearnGoal` (or a dict; default goal and guards when None). With `steps` null in the
  params the run is goal-driven, with `lr` null its learning rate comes from a range test (`driver.py`).
- `device`: where the model and data go (None: where the model already is); `autocast`: the dtype of the
  training forward passes (`torch.bfloat16`; the job passes `workers.device.autocast_dtype` under
  `AMEND_PRECISION`), None for float32 — ignored on a device type torch cannot autocast.
- `progress(fraction, stage)` is called with stages "evaluating", "preparing", "unlearning", "done";
  `should_cancel()` is polled between steps and raises `UnlearnCancelled`.

The report: {"method", "params", "family", "peft", "steps", "seconds", "before": {...}, "after": {...},
"goal_met", "goal": {...}, "loop": {...}} (+ "gu_kept_fraction" when `gu` ran). A language model's before/after
also carry TOFU's forget quality and model utility, ROUGE-L recall and MUSE's PrivLeak (`standard_metrics.py`);
seeds, a retrained reference and probes are `protocol.py`'s. `goal` holds `met`, `reason`
(when not met: which budget or guard stopped the run, and the best state reached), the kind of forgetting,
the targets, the final measurement on the full splits, the chosen `lr` and the range test. `seconds` is the
whole call; `method_seconds` the method's run — mask/Fisher/importance preparation (`prepare_seconds`),
the range test and the goal checks (`check_seconds`) included, the before/after reports excluded — and
`method_cpu_seconds` its process CPU time.
Methods are looked up only through the registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from app.schemas.unlearn import UNLEARN_FAMILIES, UnlearnGoal, accepts_learn, missing_inputs
from workers.engines.registry import get
from workers.engines.unlearn import driver
from workers.engines.unlearn.data import ClassifierData, Data, LMData
from workers.engines.unlearn.errors import MissingInput, NonFinite, UnlearnError, UnsupportedFamily
from workers.engines.unlearn.goal import GoalCheck
from workers.engines.unlearn.loop import UnlearnContext
from workers.engines.unlearn.metrics import capped, classifier_outputs, evaluate
from workers.engines.unlearn.standard_metrics import lm_standard

log = logging.getLogger(__name__)

Family = Literal["causal_lm", "classifier"]


@dataclass
class UnlearnOutcome:
    model: nn.Module
    report: dict[str, Any]
    truth_ratios: dict[str, Any] = field(default_factory=dict)  # language models, after: per split (not in JSON)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _check_data(family: str, name: str, data: Data | None) -> None:
    expected = ClassifierData if family == "classifier" else LMData
    if data is not None and not isinstance(data, expected):
        raise UnlearnError(f"{name}: a {family} needs {expected.__name__}, got {type(data).__name__}")


def unlearn(
    model: nn.Module,
    family: Family,
    method: str,
    params: BaseModel | Mapping[str, Any],
    forget: Data | None,
    retain: Data | None = None,
    evaluation: Data | None = None,
    tokenizer: Any = None,
    progress: Callable[[float, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    goal: UnlearnGoal | Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    learn: Data | None = None,
) -> UnlearnOutcome:
    """Unlearn `forget` from `model` with the registered `method`; see the module docstring."""
    entry = get("unlearn", method)
    raw = params.model_dump(by_alias=True) if isinstance(params, BaseModel) else dict(params)
    try:
        checked: Any = entry.params_model.model_validate(raw)
        aim = goal if isinstance(goal, UnlearnGoal) else UnlearnGoal.model_validate(dict(goal or {}))
    except ValidationError as error:
        raise UnlearnError(f"invalid {method} params or goal: {error}") from None
    if family not in UNLEARN_FAMILIES.get(method, frozenset()):
        raise UnsupportedFamily(f"{method} does not support {family} models")
    if learn is not None and not accepts_learn(method):
        raise UnlearnError(f"{method} takes no learn rows: only methods that learn while forgetting (ug_clu) do")
    provided = {name for name, data in (("forget", forget), ("retain", retain), ("learn", learn)) if data is not None}
    missing = missing_inputs(method, checked, provided)
    if missing:
        raise MissingInput(f"{method} needs {', '.join(missing)}")
    for name, data in (("forget", forget), ("retain", retain), ("evaluation", evaluation), ("learn", learn)):
        _check_data(family, name, data)
    is_peft = _is_peft(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise UnlearnError("the model has no trainable parameter")
    if device is not None:  # the worker's device (workers/device.py); None: where the model already is
        model.to(device)
    device = next(model.parameters()).device
    seed = int(checked.seed)
    started = time.perf_counter()

    def report_progress(fraction: float, stage: str) -> None:
        if progress is not None:
            progress(fraction, stage)

    report_progress(0.0, "evaluating")
    before = measure(model, family, forget, retain, evaluation, device, seed, learn)[0]
    check = GoalCheck.build(model, family, forget, retain, evaluation, aim, seed, device, learn=learn)
    start = check.begin(model) if check.measurable else None
    torch.manual_seed(seed)
    ctx = UnlearnContext(
        model=model,
        family=family,
        forget=forget,
        retain=retain,
        tokenizer=tokenizer,
        generator=torch.Generator().manual_seed(seed),
        device=device,
        trainable=trainable,
        is_peft=is_peft,
        horizon=int(checked.steps or min(aim.max_steps, driver.GOAL_HORIZON)),
        autocast=autocast if autocast is not None and torch.amp.is_autocast_available(device.type) else None,
        learn=learn,
    )
    report_progress(0.05, "preparing")
    method_started, method_cpu_started = time.perf_counter(), time.process_time()
    objective = entry.function(ctx, checked)
    prepare_seconds = time.perf_counter() - method_started
    loop = driver.run(
        ctx,
        objective,
        checked,
        check,
        start,
        progress=lambda fraction, stage: report_progress(0.05 + 0.85 * fraction, stage),
        should_cancel=should_cancel,
    )
    method_seconds = time.perf_counter() - method_started
    method_cpu_seconds = time.process_time() - method_cpu_started
    for name, parameter in trainable:
        if not torch.isfinite(parameter).all():
            raise NonFinite(f"parameter {name} is not finite after unlearning")
    report_progress(0.9, "evaluating")
    after, truth_ratios = measure(model, family, forget, retain, evaluation, device, seed, learn)
    verdict = goal_verdict(check, loop, model, is_peft)
    report: dict[str, Any] = {
        "method": method,
        "params": checked.model_dump(mode="json", by_alias=True),
        "family": family,
        "peft": is_peft,
        "autocast": None if ctx.autocast is None else str(ctx.autocast).removeprefix("torch."),
        "trainable_parameters": sum(p.numel() for _, p in (objective.trainable or trainable)),
        "steps": loop.pop("steps"),
        "seconds": time.perf_counter() - started,
        "method_seconds": method_seconds,
        "method_cpu_seconds": method_cpu_seconds,
        "prepare_seconds": prepare_seconds,
        "before": before,
        "after": after,
        "goal_met": verdict["met"],
        "goal": verdict,
        "loop": {**objective.report, **{k: v for k, v in loop.items() if k != "check"}},
    }
    if "gu_kept_fraction" in loop:
        report["gu_kept_fraction"] = loop["gu_kept_fraction"]
    report_progress(1.0, "done")
    log.info("unlearned", extra={"method": method, "steps": report["steps"]})
    return UnlearnOutcome(model=model, report=report, truth_ratios=truth_ratios)


def measure(
    model: nn.Module,
    family: str,
    forget: Data | None,
    retain: Data | None,
    evaluation: Data | None,
    device: torch.device,
    seed: int,
    learn: Data | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The before/after report of one state: `evaluate`'s figures (and the learn rows' accuracy and mean CE
    when the run learns rows), and for language models the standard ones (`standard_metrics.lm_standard`); the
    raw truth ratios beside."""
    figures = evaluate(model, family, forget, retain, evaluation, device, seed)
    if isinstance(learn, ClassifierData):
        outputs = classifier_outputs(model, capped(learn, seed), device)
        figures["learn_accuracy"] = 100.0 * float(outputs["correct"].float().mean())
        figures["learn_loss"] = float(outputs["loss"].mean())
    if family == "classifier":
        return figures, {}
    standard, ratios = lm_standard(
        model, forget, retain, evaluation, device, seed, figures.get("min_k_auc")  # type: ignore[arg-type]
    )
    return {**figures, **standard}, ratios


STOPS = {
    "max_steps": "the step budget ({max_steps} steps, range test included) ran out",
    "max_seconds": "the time budget ({max_seconds:g} s) ran out",
    "guard": "a guard kept breaking after the learning rate was halved {halvings} times",
    "no_progress": "{stall} checks in a row brought no state nearer the goal that kept the guards",
    "steps": "after the fixed {steps} steps",
    "goal": "the goal was met on the checked subsets ({eval_rows} rows per split) but not on the full splits",
}


def goal_verdict(check: GoalCheck, loop: dict[str, Any], model: nn.Module, is_peft: bool) -> dict[str, Any]:
    """Whether the returned model meets the goal on the full splits (capped as the report is) and keeps the
    guards; when not, a reason naming what stopped the run and the state reached."""
    out: dict[str, Any] = {
        "met": False,
        "reason": None,
        **check.describe(),
        "mode": loop.get("mode"),
        "stopped_by": loop.get("stopped_by"),
        "lr": loop.get("lr"),
        "lr_search": loop.get("lr_search"),
        "steps": loop.get("steps"),
        "best_step": loop.get("best_step"),
    }
    if not check.measurable:
        out["reason"] = f"the goal cannot be measured: {check.why_not}"
        return out
    final = check.measure(model, full=True)
    out["final"] = final.as_dict()
    if final.goal_met and final.guards_ok:
        out["met"] = True
        return out
    goal = check.goal
    stopped = loop.get("stopped_by")
    words = STOPS.get(str(stopped), "after {method}'s one-shot edit").format(
        max_steps=goal.max_steps,
        max_seconds=goal.max_seconds,
        halvings=driver.MAX_HALVINGS,
        stall=driver.STALL_CHECKS,
        steps=loop.get("steps"),
        eval_rows=goal.eval_rows,
        method="the method",
    )
    state = "the best state that kept the guards" if loop.get("mode") == "goal" else "the final state"
    step = f" (step {loop['best_step']})" if loop.get("best_step") is not None else ""
    details = "; ".join(final.unmet + [f"guard broken: {item}" for item in final.broken]) or "no condition met"
    reason = f"{words}; {state}{step}: {details}"
    if is_peft and final.unmet:
        reason += (
            "; only LoRA factors were trained — a higher rank or more target modules may be needed to reach the goal"
        )
    out["reason"] = reason
    return out
