"""Admission checks of an unlearning job: the model, adapter and datasets exist for this tenant and fit the
method and each other."""

from __future__ import annotations

from app.errors import Unprocessable
from app.records import Records
from app.schemas.jobs import UnlearnJobCreate
from app.schemas.unlearn import UNLEARN_FAMILIES, UNLEARN_PARAMS, missing_inputs
from app.settings import Settings

# dataset kinds each model family can learn from
FAMILY_DATASETS = {"causal_lm": {"lm"}, "classifier": {"text_classification", "image_classification"}}


def check(records: Records, settings: Settings, tenant: str, spec: UnlearnJobCreate) -> None:
    model = records.get_resource("models", tenant, spec.model)
    if spec.adapter:
        records.get_adapter(tenant, spec.adapter)
    if model.family not in UNLEARN_FAMILIES[spec.method]:
        raise Unprocessable(
            f"{spec.method} does not support {model.family} models (it supports "
            f"{', '.join(sorted(UNLEARN_FAMILIES[spec.method]))})",
            code="unsupported_family",
        )
    if spec.method == "ssd" and spec.output == "adapter" and spec.adapter is None:
        raise Unprocessable(
            "ssd only scales existing weights down, and a fresh LoRA's update is zero (B = 0): use output "
            "'weights', or name the adapter to dampen",
            code="incompatible_inputs",
        )
    params = UNLEARN_PARAMS[spec.method].model_validate(spec.params)
    provided = {"forget"} | ({"retain"} if spec.retain else set()) | ({"learn"} if spec.learn else set())
    missing = missing_inputs(spec.method, params, provided)
    if missing:
        raise Unprocessable(f"{spec.method} needs {', '.join(missing)} data; the job has none", code="missing_input")
    if spec.reference == "retrain" and not spec.retain:
        raise Unprocessable("reference 'retrain' trains on the retain rows; the job has none", code="missing_input")
    forget = records.get_resource("datasets", tenant, spec.forget.dataset)
    if spec.forget.rows and spec.forget.rows[-1] >= forget.rows:
        raise Unprocessable(
            f"forget row {spec.forget.rows[-1]} does not exist: dataset {forget.id} has rows 0..{forget.rows - 1}",
            code="invalid_rows",
        )
    if spec.learn is not None:
        learn = records.get_resource("datasets", tenant, spec.learn.dataset)
        beyond = next((row for row in spec.learn.rows or () if row >= learn.rows), None)
        if beyond is not None:
            raise Unprocessable(
                f"learn row {beyond} does not exist: dataset {learn.id} has rows 0..{learn.rows - 1}",
                code="invalid_rows",
            )
    for dataset_id in spec.dataset_ids():
        dataset = records.get_resource("datasets", tenant, dataset_id)
        if dataset.kind not in FAMILY_DATASETS[model.family]:
            raise Unprocessable(
                f"dataset {dataset.id} holds {dataset.kind} rows, which a {model.family} model cannot use",
                code="incompatible_inputs",
            )
        if dataset.kind == "text_classification" and not model.has_tokenizer:
            raise Unprocessable(f"model {model.id} has no tokenizer for text rows", code="incompatible_inputs")
        images = model.architecture.endswith("ForImageClassification")
        if model.family == "classifier" and images != (dataset.kind == "image_classification"):
            raise Unprocessable(
                f"dataset {dataset.id} holds {dataset.kind} rows, which {model.architecture} cannot take",
                code="incompatible_inputs",
            )
        if dataset.num_labels is not None and model.num_labels is not None and dataset.num_labels > model.num_labels:
            raise Unprocessable(
                f"dataset {dataset.id} has {dataset.num_labels} labels, model {model.id} only {model.num_labels}",
                code="incompatible_inputs",
            )
    if model.family == "causal_lm" and not model.has_tokenizer:
        raise Unprocessable(f"model {model.id} has no tokenizer for its text rows", code="incompatible_inputs")
