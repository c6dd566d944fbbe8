"""The `tune` step of a merge job: fetch the base model and each task's validation rows, grid-search the
merge's λ / density / β on them (`workers.engines.merge.tune`), and return the chosen params and the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.schemas.jobs import MergeJobCreate
from app.schemas.merge import MERGE_PARAMS, MergeOutput, MergeTune
from app.schemas.models import ModelRecord
from workers.jobs.context import InputRejected, JobContext
from workers.jobs.inputs import dataset_record, fetch_dataset, fetch_model, model_record


def load_base_model(context: JobContext, model_id: str, into: Path) -> tuple[ModelRecord, Any, Any]:
    """(record, model, tokenizer or None) of a merge step's registered base model (tune, calibration):
    fetched SHA-256-checked into `into`, loaded in float32 with transformers, gradients off."""
    from workers.formats.hf_models import load_model

    record = model_record(context.records, context.job.tenant, model_id)
    model, tokenizer = load_model(fetch_model(context.records, record, into), record)
    model.requires_grad_(False)
    return record, model, tokenizer


def tune_params(
    context: JobContext, spec: MergeJobCreate, tune: MergeTune, inputs: list[tuple[dict, Path, float]], root: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the params of the best grid point, the report's `tune` section). Progress runs from 0.3 to 0.8, one
    step per point; a cancel stops the job between points."""
    from workers.engines.merge.engine import merge_modules
    from workers.engines.merge.tune import evaluate, grid_search
    from workers.formats.hf_models import HfFormatError, load_data, max_tokens
    from workers.formats.lora import read_adapter_factors

    job, records = context.job, context.records
    context.progress(0.3, "tuning: fetching the base model and the validation rows")
    model_in, model, tokenizer = load_base_model(context, tune.model, root / "tune-model")
    kind = "nll" if model_in.family == "causal_lm" else "accuracy"
    data = {}
    for item in tune.validation:
        dataset = dataset_record(records, job.tenant, item.dataset)
        path = fetch_dataset(records, dataset, root / "tune-data")
        data[item.adapter] = load_data(path, dataset, None, model_in.family, tokenizer, max_tokens(model))

    # every adapter's factors in memory once (weight and scaling folded in), and each task's own adapter
    read = [read_adapter_factors(config, path, weight) for config, path, weight in inputs]
    names = list(dict.fromkeys(name for per in read for name in per))
    modules = {name: [per.get(name) for per in read] for name in names}
    own = {}
    for item in tune.validation:
        config, path, _ = inputs[item.adapter]
        own[item.adapter] = {n: (f.lora_A, f.lora_B) for n, f in read_adapter_factors(config, path, 1.0).items()}
    output = MergeOutput.model_validate(spec.output.model_dump())
    params_model = MERGE_PARAMS[spec.method]

    def merge_at(point: dict[str, float]) -> dict[str, Any]:
        params = params_model.model_validate({**spec.params, **point})
        merged = merge_modules(spec.method, modules, params, output)
        return {name: (m.lora_A, m.lora_B) for name, m in merged.modules.items()}

    def scorer(task: int) -> Any:
        from workers.engines.merge.tune import lora_applied

        def score(factors: dict[str, Any]) -> float:
            try:
                with lora_applied(model, factors):
                    return evaluate(model, data[task], kind)
            except AttributeError as error:  # a module name the model does not have
                raise InputRejected(f"the adapters do not fit model {model_in.id}: {error}") from None

        return score

    points = tune.points()

    def progress(done: int, total: int) -> None:
        context.progress(0.3 + 0.5 * done / total, f"tuning: {done}/{total} grid points evaluated")

    try:
        result = grid_search(points, merge_at, [(t, scorer(t)) for t in data], own, tune.objective, kind == "accuracy",
                      progress)
    except HfFormatError as error:
        raise InputRejected(str(error)) from None
    best = {**spec.params, **result.point}
    section = {
        "model": model_in.id,
        "metric": "accuracy (higher is better)" if kind == "accuracy" else "mean answer NLL (lower is better)",
        "normalised": "score / own adapter's score" if kind == "accuracy" else "own adapter's NLL / NLL",
        "objective": tune.objective,
        "best": result.best,
        "best_point": result.point,
        "table": result.table,
    }
    return params_model.model_validate(best).model_dump(mode="json", by_alias=True), section
