"""Admission checks of a merge job: the adapters exist for this tenant, are not too many, and share a base;
with `tune`, the model and validation datasets exist and fit each other; with `calibration` (rain), the model is
a causal LM with a tokenizer and the calibration datasets hold language-model rows. Whether the markers are
in the tokenizer's vocabulary is only known once the tokenizer is loaded: the worker refuses that
(`invalid_input`) before any compute."""

from __future__ import annotations

from app.errors import Unprocessable
from app.jobs.unlearn import FAMILY_DATASETS
from app.records import Records
from app.schemas.jobs import MergeJobCreate
from app.schemas.merge import MergeCalibration, MergeTune
from app.settings import Settings


def check(records: Records, settings: Settings, tenant: str, spec: MergeJobCreate) -> None:
    adapter_ids = spec.input_adapter_ids()
    if len(adapter_ids) > settings.max_merge_adapters:
        raise Unprocessable(f"at most {settings.max_merge_adapters} adapters per merge", code="too_many_adapters")
    adapters = [records.get_adapter(tenant, adapter_id) for adapter_id in adapter_ids]
    if not spec.params.get("allow_base_mismatch"):
        bases = {a.base_model for a in adapters if a.base_model}
        if len(bases) > 1:
            raise Unprocessable(
                f"the adapters were trained on different base models {sorted(bases)}; "
                "set params.allow_base_mismatch to merge them anyway",
                code="incompatible_adapters",
            )
    if spec.tune is not None:
        _check_tune(records, tenant, spec.tune)
    if spec.calibration is not None:
        _check_calibration(records, tenant, spec.calibration)


def _check_calibration(records: Records, tenant: str, calibration: MergeCalibration) -> None:
    """The calibration model is a causal LM with a tokenizer; its datasets exist and hold lm rows."""
    model = records.get_resource("models", tenant, calibration.model)
    if model.family != "causal_lm":
        raise Unprocessable(
            f"model {model.id} is a {model.family}; calibration needs a causal language model",
            code="incompatible_inputs",
        )
    if not model.has_tokenizer:
        raise Unprocessable(
            f"model {model.id} has no tokenizer: the thinking markers and calibration rows cannot be tokenized",
            code="incompatible_inputs",
        )
    for dataset_id in (calibration.reasoning, calibration.instruction):
        if dataset_id is None:
            continue
        dataset = records.get_resource("datasets", tenant, dataset_id)
        if dataset.kind != "lm":
            raise Unprocessable(
                f"calibration dataset {dataset.id} holds {dataset.kind} rows; it needs language-model rows",
                code="incompatible_inputs",
            )


def _check_tune(records: Records, tenant: str, tune: MergeTune) -> None:
    """The tuning model and every validation dataset exist for this tenant and fit each other."""
    model = records.get_resource("models", tenant, tune.model)
    if model.family == "causal_lm" and not model.has_tokenizer:
        raise Unprocessable(f"model {model.id} has no tokenizer for its text rows", code="incompatible_inputs")
    for item in tune.validation:
        dataset = records.get_resource("datasets", tenant, item.dataset)
        if dataset.kind not in FAMILY_DATASETS[model.family]:
            raise Unprocessable(
                f"validation dataset {dataset.id} holds {dataset.kind} rows, which a {model.family} model cannot "
                "be evaluated on",
                code="incompatible_inputs",
            )
        if dataset.kind == "text_classification" and not model.has_tokenizer:
            raise Unprocessable(f"model {model.id} has no tokenizer for text rows", code="incompatible_inputs")

