"""One unlearning job's runs: its seeds, its retrained reference and its robustness probes around `unlearn`.

    outcome = unlearn_job(model, family, method, params, forget, retain, evaluation, tokenizer=..., goal=...,
                          seeds=[0, 1, 2], reference_model=copy_of_the_model_to_retrain, probes=["quantize"])

- `seeds` (default: the params' seed): the method runs once per seed, each from a copy of the input model;
  the first seed's model is the outcome's, and the report's `seeds` gives every after-metric (and gap) as
  mean ± std (population std) over the seeds, and which seeds met the goal.
- `reference_model`: a model to retrain from scratch on the retain rows with `retrain` (`reference_params`),
  once per seed — the gold standard of the SalUn and SFR-on protocol. For classifiers the report's `gap`
  holds |value − retrained| per UA/RA/TA/MIA and their mean `avg_gap`; for language models the after-report's
  `forget_quality` becomes the KS p-value against the retrained model's truth ratios on the forget rows, and
  `privleak` is measured against the retrained model's Min-K% AUC. `time_vs_reference` is the method's
  `method_seconds` over the retrain's.
- `learn`: rows a continual job learns (`ug_clu`); the reference then retrains on retain ∪ learn rows (the
  final data) and is measured on the method's splits, learn rows included.
- `probes` (`probes.py`): re-measure the first seed's model after weight quantization or relearning, beside
  the after-metrics; `robust` is false when one brings the forgetting back past the goal.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel
from torch import nn

from app.schemas.unlearn import UnlearnGoal
from workers.engines.unlearn.data import ClassifierData, Data, joined
from workers.engines.unlearn.engine import UnlearnOutcome, measure, unlearn
from workers.engines.unlearn.standard_metrics import avg_gap, forget_quality, privleak


def unlearn_job(
    model: nn.Module,
    family: Any,
    method: str,
    params: BaseModel | Mapping[str, Any],
    forget: Data | None,
    retain: Data | None = None,
    evaluation: Data | None = None,
    tokenizer: Any = None,
    goal: UnlearnGoal | Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    reference_model: nn.Module | None = None,
    reference_params: Mapping[str, Any] | None = None,
    probes: Sequence[str] = (),
    progress: Callable[[float, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    device: Any = None,
    autocast: Any = None,
    learn: Data | None = None,
) -> UnlearnOutcome:
    """Run `method` once per seed (plus a retrained reference and probes when asked); see the module docstring."""
    raw = params.model_dump(by_alias=True) if isinstance(params, BaseModel) else dict(params)
    seeds = list(seeds) if seeds else [int(raw.get("seed", 0))]
    runs = 1 + (len(seeds) - 1) + (len(seeds) if reference_model is not None else 0) + len(probes)
    pristine = copy.deepcopy(model) if len(seeds) > 1 else None
    done = [0]

    def part(fraction: float, stage: str) -> None:
        if progress is not None:
            progress(min(1.0, (done[0] + fraction) / runs), stage)

    def common(seed: int) -> dict[str, Any]:
        return {
            "tokenizer": tokenizer,
            "progress": part,
            "should_cancel": should_cancel,
            "device": device,
            "autocast": autocast,
            "goal": goal,
            "forget": forget,
            "retain": retain,
            "evaluation": evaluation,
        }

    outcomes: list[UnlearnOutcome] = []
    references: list[UnlearnOutcome] = []
    for number, seed in enumerate(seeds):
        subject = model if number == 0 else copy.deepcopy(pristine if pristine is not None else model)
        outcomes.append(unlearn(subject, family, method, {**raw, "seed": seed}, learn=learn, **common(seed)))
        done[0] += 1
        if reference_model is not None:
            retrained = copy.deepcopy(reference_model)
            settings = {**dict(reference_params or {}), "seed": seed}
            if isinstance(learn, ClassifierData) and isinstance(retain, ClassifierData):
                # the oracle of a continual job: trained on the final data, measured on the method's splits
                final = {**common(seed), "retain": joined(retain, learn)}
                references.append(unlearn(retrained, family, "retrain", settings, **final))
                references[-1].report["after"] = measure(
                    references[-1].model, family, forget, retain, evaluation,
                    next(references[-1].model.parameters()).device, seed, learn,
                )[0]
            else:
                references.append(unlearn(retrained, family, "retrain", settings, **common(seed)))
            done[0] += 1
            compare(outcomes[-1], references[-1], family)
    first = outcomes[0]
    report = first.report
    if len(seeds) > 1:
        report["seeds"] = summarise(seeds, outcomes)
    if probes:
        from workers.engines.unlearn.probes import run_probes

        aim = goal if isinstance(goal, UnlearnGoal) else UnlearnGoal.model_validate(dict(goal or {}))
        part(0.0, "probing")
        report["probes"] = run_probes(
            first.model,
            family,
            probes,
            forget,
            retain,
            evaluation,
            report,
            aim,
            reference=references[0].model if references else None,
            should_cancel=should_cancel,
        )
        verdicts = [result.get("robust") for result in report["probes"].values()]
        report["robust"] = None if all(v is None for v in verdicts) else all(v is not False for v in verdicts)
    return first


def compare(outcome: UnlearnOutcome, reference: UnlearnOutcome, family: str) -> None:
    """Put the retrained reference and the gaps to it into the outcome's report."""
    report, retrained = outcome.report, reference.report
    report["reference"] = {
        "method": "retrain",
        "params": retrained["params"],
        "after": retrained["after"],
        "steps": retrained["steps"],
        "method_seconds": retrained["method_seconds"],
        "method_cpu_seconds": retrained["method_cpu_seconds"],
    }
    report["time_vs_reference"] = report["method_seconds"] / max(retrained["method_seconds"], 1e-9)
    if family == "classifier":
        report["gap"] = avg_gap(report["after"], retrained["after"])
        return
    after = report["after"]
    ours, theirs = outcome.truth_ratios.get("forget"), reference.truth_ratios.get("forget")
    if ours is not None and theirs is not None:
        after["forget_quality"] = forget_quality(ours["fq"], theirs["fq"])
        after["forget_quality_reference"] = "retrain"
    if "min_k_auc" in after and "min_k_auc" in retrained["after"]:
        after["privleak"] = privleak(after["min_k_auc"], retrained["after"]["min_k_auc"])
        after["privleak_reference"] = "retrain"


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def summarise(seeds: list[int], outcomes: list[UnlearnOutcome]) -> dict[str, Any]:
    """Mean ± std over seeds of every numeric after-metric and gap, and which seeds met the goal."""
    out: dict[str, Any] = {"seeds": seeds, "goal_met": [o.report["goal_met"] for o in outcomes]}
    for section in ("after", "gap"):
        reports = [o.report.get(section) or {} for o in outcomes]
        keys = [k for k, v in reports[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
        spread = {k: _spread([float(r[k]) for r in reports if k in r]) for k in keys if all(k in r for r in reports)}
        if spread:
            out[section] = spread
    times = [o.report["method_seconds"] for o in outcomes]
    out["method_seconds"] = _spread(times)
    if all("time_vs_reference" in o.report for o in outcomes):
        out["time_vs_reference"] = _spread([o.report["time_vs_reference"] for o in outcomes])
    return out
