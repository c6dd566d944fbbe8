"""The rain merge contract at the door: the calibration block goes with calibrated methods only, never with
`tune`; markers differ; the coefficient box is ordered; the radius default depends on `preserve`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.schemas.jobs import MergeJobCreate
from app.schemas.merge import MERGE_PARAMS, RainParams

ADAPTER, MODEL, DATA = "ad_" + "0" * 16, "md_" + "1" * 16, "ds_" + "2" * 16
CALIBRATION = {"model": MODEL, "reasoning": DATA}


def spec(**fields) -> MergeJobCreate:
    return MergeJobCreate.model_validate({"type": "merge", "adapters": [{"id": ADAPTER}], **fields})


def test_rain_takes_a_calibration_block_with_default_markers() -> None:
    job = spec(method="rain", calibration=CALIBRATION)
    assert job.calibration is not None and job.calibration.markers == ("<think>", "</think>")
    assert job.params["preserve"] == "features"
    assert [name for name, model in MERGE_PARAMS.items() if model.calibrated] == ["rain"]


@pytest.mark.parametrize("fields, message", [
    ({"method": "rain"}, "needs a calibration block"),
    ({"method": "ties", "calibration": CALIBRATION}, "takes no calibration block"),
    ({"method": "rain", "calibration": CALIBRATION,
      "tune": {"model": MODEL, "validation": [{"adapter": 0, "dataset": DATA}], "search": {"lambda": [1.0]}}},
     "cannot be tuned"),
    ({"method": "rain", "calibration": {**CALIBRATION, "markers": ["<think>", "<think>"]}}, "must differ"),
    ({"method": "rain", "calibration": {**CALIBRATION, "reasoning": "../x"}}, "pattern"),
    ({"method": "rain", "calibration": CALIBRATION, "params": {"alpha_min": 2.0, "alpha_max": 1.0}}, "alpha_min"),
    ({"method": "rain", "calibration": CALIBRATION, "params": {"preserve": "logits"}}, "preserve"),
    ({"method": "rain", "calibration": CALIBRATION, "params": {"radius": 99}}, "radius"),
])
def test_refused_specs(fields, message) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


def test_the_radius_default_follows_preserve() -> None:
    assert RainParams().neighbourhood() == 0
    assert RainParams(preserve="code").neighbourhood() == 5
    assert RainParams(preserve="code", radius=2).neighbourhood() == 2
