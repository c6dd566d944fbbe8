"""The merge entry point the job pipeline calls: validate, look the method up in the registry, run, report.

`merge_modules` refuses what cannot be merged before any compute (`MergeInputError`, naming the module),
resolves each module's output rank from `MergeOutput`, runs the registered method (module-wise methods
batch modules themselves; whole-adapter methods such as KnOTS see every module at once), checks the
result for NaN/Inf (`MergeNumericError`) and builds the data-free report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from app.checks.peft_patterns import PatternError, PeftPattern
from app.schemas.merge import MergeOutput
from workers.engines import linalg_pool, registry
from workers.engines.merge.core_space import stack_factors
from workers.engines.merge.errors import MergeInputError, MergeNumericError
from workers.engines.merge.report import factor_grams, module_reports, shape_key, summarize
from workers.engines.merge.types import MergeJob, MergeResult, ModuleGrams, RankTarget, TaskFactors, finite

MAX_TASKS = 64
REPORT_BATCH = 32  # modules whose reports are computed together (their Grams are stacked)


def _params(model: type[BaseModel], params: BaseModel | Mapping[str, Any]) -> BaseModel:
    """Validate `params` with the method's own params model (the worker re-validates the contract)."""
    if isinstance(params, model):
        return params
    raw = params.model_dump(by_alias=True) if isinstance(params, BaseModel) else dict(params)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise MergeInputError(f"invalid parameters for this method: {exc}") from None


def _check_module(
    name: str, tasks: Sequence[TaskFactors | None], num_tasks: int, check_finite: bool
) -> list[TaskFactors | None]:
    if len(tasks) != num_tasks:
        raise MergeInputError(f"module {name!r}: {len(tasks)} entries, expected one per adapter ({num_tasks})")
    shapes: dict[int, tuple[int, int]] = {}
    out: list[TaskFactors | None] = []
    device = None
    for t, f in enumerate(tasks):
        if f is None:
            out.append(None)
            continue
        a, b = f.lora_A, f.lora_B
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise MergeInputError(
                f"module {name!r}, adapter {t}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "are not a (r×n, m×r) pair with r ≥ 1"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise MergeInputError(f"module {name!r}, adapter {t}: factors must be floating point")
        if device is None:
            device = a.device
        if a.device != device or b.device != device:
            raise MergeInputError(f"module {name!r}, adapter {t}: factors on different devices")
        shapes[t] = (int(b.shape[0]), int(a.shape[1]))
        if check_finite and not (finite(a) and finite(b)):
            raise MergeInputError(f"module {name!r}, adapter {t}: factors contain NaN or Inf")
        if a.dtype != torch.float32 or b.dtype != torch.float32:
            f = TaskFactors(lora_A=a.float(), lora_B=b.float())
        out.append(f)
    if not shapes:
        raise MergeInputError(f"module {name!r}: no adapter has this module")
    if len(set(shapes.values())) > 1:
        seen = ", ".join(f"adapter {t}: {m}×{n}" for t, (m, n) in shapes.items())
        raise MergeInputError(f"module {name!r}: base shapes differ across adapters ({seen})")
    return out


def _targets(modules: dict[str, list[TaskFactors | None]], output: MergeOutput) -> dict[str, RankTarget]:
    try:  # PEFT's rank_pattern rule, the one the adapters' own patterns are read with
        pattern = PeftPattern.compile(output.rank_pattern, "rank_pattern")
    except PatternError as error:
        raise MergeInputError(str(error)) from None
    targets: dict[str, RankTarget] = {}
    used: set[str] = set()
    for name, tasks in modules.items():
        present = [f for f in tasks if f is not None]
        default = max(f.rank for f in present)
        m, n = int(present[0].lora_B.shape[0]), int(present[0].lora_A.shape[1])
        rank = output.rank if output.rank is not None else default
        key = pattern.key_for(name)
        if key is not None:
            value = pattern.values[key]
            if value > min(m, n):
                raise MergeInputError(
                    f"module {name!r}: rank_pattern[{key!r}] = {value} exceeds min(m, n) = {min(m, n)}"
                )
            rank, used = value, used | {key}
        targets[name] = RankTarget(rank=rank, energy=output.energy)
    unused = sorted(set(output.rank_pattern or {}) - used)
    if unused:
        raise MergeInputError(f"rank_pattern keys match no module: {unused}")
    return targets


def validate_inputs(
    modules: Mapping[str, Sequence[TaskFactors | None]],
    output: MergeOutput,
    progress: Callable[[float, str], None] | None = None,
    check_finite: bool = True,
) -> MergeJob:
    """Check every module before any compute and resolve output ranks; raises `MergeInputError`.
    `check_finite=False` skips the NaN/Inf scan for callers that already refused non-finite factors."""
    if not modules:
        raise MergeInputError("no modules to merge")
    num_tasks = max(len(tasks) for tasks in modules.values())
    if num_tasks < 1:
        raise MergeInputError("no adapters to merge")
    if num_tasks > MAX_TASKS:
        raise MergeInputError(f"{num_tasks} adapters; at most {MAX_TASKS} can be merged at once")
    checked = {name: _check_module(name, tasks, num_tasks, check_finite) for name, tasks in modules.items()}
    return MergeJob(
        modules=checked,
        targets=_targets(checked, output),
        num_tasks=num_tasks,
        progress=progress or (lambda fraction, stage: None),
    )


def merge_modules(
    method: str,
    modules: Mapping[str, Sequence[TaskFactors | None]],
    params: BaseModel,
    output: MergeOutput,
    progress: Callable[[float, str], None] | None = None,
    loader: Callable[[str], list[TaskFactors | None]] | None = None,
    calibration: Any = None,
) -> MergeResult:
    """Merge T adapters module by module with the registered `method`; returns factors and the report.

    `modules[name]` lists each adapter's TaskFactors (None where it lacks the module); lora_B carries
    weight·scaling. `params` is (or validates as) the method's params model; `output` gives the rank.
    With a `loader` (streaming from files), `modules` may hold shape-only "meta" tensors and the loader
    reads a module's factors when a method asks for them; it refuses NaN/Inf factors itself, per tensor
    while the data is in cache, so the up-front scan is skipped. `calibration` carries a calibrated method's
    model and rows (`rain.RainCalibration`); what the method notes goes into the report under its name.
    """
    entry = registry.get("merge", method)
    checked = _params(entry.params_model, params)
    job = validate_inputs(modules, output, progress, check_finite=loader is None)
    job.loader = loader
    job.calibration = calibration
    job.progress(0.0, f"merging {len(job.modules)} modules of {job.num_tasks} adapters ({method})")
    try:
        merged = entry.function(job, checked)
    except torch.linalg.LinAlgError as exc:  # only reachable with non-finite intermediates (overflow)
        raise MergeNumericError(f"{method}: a factorisation failed on non-finite values ({exc})") from None
    lambda_ = float(getattr(checked, "lambda_", 1.0))
    # reports of modules with the same tasks, ranks and Gram shapes are computed together
    groups: dict[tuple[object, ...], list[tuple[str, ModuleGrams, list[int], list[int]]]] = {}
    for name, result in merged.items():
        if not (finite(result.lora_A) and finite(result.lora_B)):
            raise MergeNumericError(f"module {name!r}: the merged factors contain NaN or Inf")
        tasks = [t for t, f in enumerate(job.modules[name]) if f is not None]
        ranks = [f.rank for f in job.modules[name] if f is not None]
        grams = result.grams or factor_grams(stack_factors(name, job.factors(name)), result.lora_B, result.lora_A)
        result.grams = None
        groups.setdefault(shape_key(grams, ranks, tasks), []).append((name, grams, ranks, tasks))
    computed: dict[str, dict[str, Any]] = {}
    chunks = [group[i : i + REPORT_BATCH] for group in groups.values() for i in range(0, len(group), REPORT_BATCH)]
    with linalg_pool.pool_only():  # small batched decompositions: parallel on the pool only
        for members in chunks:
            _, _, ranks, tasks = members[0]
            reports = module_reports(
                [grams for _, grams, _, _ in members], ranks, tasks, job.num_tasks, lambda_,
                [merged[name] for name, _, _, _ in members],
            )
            computed.update((name, rep) for (name, _, _, _), rep in zip(members, reports, strict=True))
    per_module: dict[str, dict[str, Any]] = {}
    for name, result in merged.items():  # in the method's order
        per_module[name] = result.report = computed[name]
    job.progress(1.0, "merged")
    report = {
        "method": method,
        "params": checked.model_dump(mode="json", by_alias=True),
        "output": output.model_dump(mode="json"),
        "summary": summarize(per_module, job.num_tasks),
        "modules": per_module,
    }
    if job.notes:
        report[method] = job.notes
    return MergeResult(modules=merged, report=report)
