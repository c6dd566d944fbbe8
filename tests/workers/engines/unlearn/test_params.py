"""The params contract: bounded, frozen, unknown keys refused; registry and schema list the same methods."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.schemas.unlearn import (
    UNLEARN_FAMILIES,
    UNLEARN_PARAMS,
    UNLEARN_REQUIREMENTS,
    GradAscentParams,
    NpoParams,
    RmuParams,
    SalunParams,
    SsdParams,
    missing_inputs,
)
from workers.engines import registry


def test_registry_and_schema_list_the_same_methods():
    assert registry.names("unlearn") == sorted(UNLEARN_PARAMS)
    assert set(UNLEARN_REQUIREMENTS) == set(UNLEARN_PARAMS) == set(UNLEARN_FAMILIES)
    for name, model in UNLEARN_PARAMS.items():
        assert registry.get("unlearn", name).params_model is model


def test_grad_ascent_is_one_method_for_both_families():
    assert UNLEARN_FAMILIES["grad_ascent"] == {"causal_lm", "classifier"}


@pytest.mark.parametrize("name", sorted(UNLEARN_PARAMS))
def test_every_params_model_refuses_unknown_keys_and_is_frozen(name):
    model = UNLEARN_PARAMS[name]
    with pytest.raises(ValidationError):
        model(not_a_field=1)
    params = model()
    with pytest.raises(ValidationError):
        params.lr = 0.5


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (NpoParams, "steps", 10_001),
        (NpoParams, "steps", 0),
        (NpoParams, "lr", 0.0),
        (NpoParams, "lr", 2.0),
        (NpoParams, "beta", -1.0),
        (GradAscentParams, "gu_retain_samples", 17),
        (GradAscentParams, "gu_retain_samples", 0),
        (SalunParams, "q", 0.0),
        (SalunParams, "q", 1.5),
        (SsdParams, "lambda", -1.0),
        (RmuParams, "trained_layers", [0, 999]),
        (RmuParams, "trained_module", "mlp; rm -rf"),
        (NpoParams, "batch_size", 0),
        (NpoParams, "max_grad_norm", 0.0),
    ],
)
def test_out_of_range_values_are_refused(model, field, value):
    with pytest.raises(ValidationError):
        model(**{field: value})


def test_missing_inputs_counts_gu_as_needing_retain():
    assert missing_inputs("grad_ascent", GradAscentParams(), {"forget"}) == []
    assert missing_inputs("grad_ascent", GradAscentParams(gu=True), {"forget"}) == ["retain"]
    assert missing_inputs("npo", NpoParams(), {"forget"}) == ["retain"]
    assert missing_inputs("flat", None, {"forget"}) == []


def test_schema_module_does_not_import_torch():
    code = "import sys, app.schemas.unlearn; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
