"""cast: the stated error is the true error of the cast factors, within the rounding bound."""

from __future__ import annotations

import pytest
import torch

from app.schemas.compress import CastParams
from tests.workers.engines.compress.helpers import dense, job, module, out_dense, rel
from workers.engines.compress.cast import cast
from workers.engines.compress.errors import CompressNumericError
from workers.engines.compress.types import AdapterModule

UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_error_is_stated_exactly_and_within_the_rounding_bound(dtype):
    mods = {"q": module(0, 48, 32, r=8, scaling=2.0), "v": module(1, 32, 64, r=4, scaling=0.25)}
    result = cast(job(mods), CastParams(dtype=dtype))
    u = UNIT_ROUNDOFF[dtype]
    errors = []
    for name, m in mods.items():
        out = result.modules[name]
        assert out.lora_A.dtype == out.lora_B.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        assert out.scaling == m.scaling and out.rank == m.rank  # the config is kept
        true = rel(out_dense(out), dense(m))
        row = result.report["modules"][name]
        assert row["rel_error"] == pytest.approx(true, rel=1e-6)
        bound = (2 * u + u * u) * m.lora_B.double().norm() * m.lora_A.double().norm() * m.scaling
        assert 0 < true <= float(bound / dense(m).norm())
        assert row["bytes_out"] * 2 == row["bytes_in"] and row["ratio"] == 2.0
        errors.append(true)
    summary = result.report["summary"]
    assert summary["max_rel_error"] == pytest.approx(max(errors), rel=1e-6)
    assert summary["mean_rel_error"] == pytest.approx(sum(errors) / 2, rel=1e-6)
    assert min(errors) <= summary["rel_error"] <= max(errors)


def test_fp16_is_more_precise_than_bf16():
    mods = {"q": module(0, 48, 32, r=8)}
    bf16 = cast(job(mods), CastParams(dtype="bf16")).report["summary"]["rel_error"]
    fp16 = cast(job(mods), CastParams(dtype="fp16")).report["summary"]["rel_error"]
    assert fp16 < bf16 / 4


def test_overflowing_fp16_is_refused():
    big = AdapterModule(lora_A=torch.full((2, 4), 1e5), lora_B=torch.ones(4, 2), scaling=1.0)
    with pytest.raises(CompressNumericError, match="overflow fp16"):
        cast(job({"big": big}), CastParams(dtype="fp16"))
    assert cast(job({"big": big}), CastParams(dtype="bf16")).report["summary"]["rel_error"] < 1e-2
