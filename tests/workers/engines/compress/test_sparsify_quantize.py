"""sparsify_quantize: the kept fraction, the quantizers' known answers, and the compact file round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from app.schemas.compress import CompressOutput, SparsifyQuantizeParams
from tests.workers.engines.compress.helpers import dense, job, module, out_dense, rel
from workers.engines.compress.sparsify_quantize import dequantize, quantize, sparsify, sparsify_quantize
from workers.formats.compact import COMPACT_FILE, read_compact
from workers.jobs.compress_files import compress_adapter_files


def test_sparsify_keeps_the_largest_entries():
    x = torch.tensor([[0.1, -5.0, 0.0, 2.0], [3.0, -0.2, 0.05, -4.0]])
    mask = sparsify(x, 0.5)
    assert mask.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert not sparsify(torch.zeros(2, 3), 1.0).any()  # zeros are never kept


def test_ternary_scale_is_the_least_squares_scale_of_the_signs():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    mask = sparsify(x, 0.25)
    q = quantize(x, mask, "ternary")
    assert q.codes.abs().max() == 1 and q.scale.numel() == 1
    assert float(q.scale) == pytest.approx(float(x[mask].abs().mean()), rel=1e-6)
    restored = dequantize(q)
    assert (restored[~mask] == 0).all()
    assert torch.equal(torch.sign(restored[mask]), torch.sign(x[mask]))
    # no other scale of these signs is closer to the kept entries
    signs = torch.sign(x[mask])
    best = float((x[mask] - float(q.scale) * signs).norm())
    for other in (0.9 * float(q.scale), 1.1 * float(q.scale)):
        assert best < float((x[mask] - other * signs).norm())


def test_int8_rounds_each_kept_entry_within_half_a_step_of_its_row():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    mask = sparsify(x, 0.5)
    q = quantize(x, mask, "int8")
    assert q.scale.shape == (16,) and q.codes.dtype == torch.int8 and q.codes.abs().max() <= 127
    restored = dequantize(q)
    step = q.scale[:, None].expand_as(x)
    assert ((restored - x).abs()[mask] <= step[mask] / 2 + 1e-7).all()
    assert (restored[~mask] == 0).all()


@pytest.mark.parametrize("bits", ["ternary", "int8"])
def test_density_one_int8_is_close_and_the_report_is_the_true_error(bits):
    mods = {"q": module(0, 48, 32, r=8, scaling=2.0), "v": module(1, 32, 64, r=4)}
    result = sparsify_quantize(job(mods), SparsifyQuantizeParams(density=1.0 if bits == "int8" else 0.3, bits=bits))
    for name, m in mods.items():
        out = result.modules[name]
        assert out.scaling == m.scaling
        row = result.report["modules"][name]
        assert row["rel_error"] == pytest.approx(rel(out_dense(out), dense(m)), rel=1e-5)
        assert row["params_out"] == sum(int(q.mask.sum()) for q in out.stored.values())
    if bits == "int8":
        assert result.report["summary"]["rel_error"] < 0.02
    # int8 at density 1: a byte per entry, a mask bit, and a float32 scale per row (heavy at rank 4-8)
    assert result.report["summary"]["ratio"] > (2.5 if bits == "int8" else 10)


@pytest.mark.parametrize("bits", ["ternary", "int8"])
def test_compact_file_round_trips_to_the_peft_file_and_peft_loads_it(adapter_dir, tmp_path, bits):
    from peft import PeftModel

    from tests.factories import tiny_llama

    source = adapter_dir("in", seed=3, r=8, alpha=16, targets=("q_proj", "v_proj", "up_proj"))
    config = json.loads((source / "adapter_config.json").read_text())
    out = tmp_path / "out"
    report = compress_adapter_files(
        config, source / "adapter_model.safetensors", "sparsify_quantize", {"density": 0.2, "bits": bits},
        CompressOutput(), out,
    )
    peft_tensors = load_file(out / "adapter_model.safetensors")
    factors, manifest = read_compact(out / COMPACT_FILE)
    assert manifest["bits"] == bits and json.loads(manifest["shapes"])
    assert {f"{name}.weight" for name in factors} == set(peft_tensors)
    for name, q in factors.items():
        assert torch.equal(dequantize(q), peft_tensors[f"{name}.weight"])  # bit for bit
        kept = int(q.mask.sum())
        assert kept <= math.ceil(0.2 * q.mask.numel())
    compact_bytes = (out / COMPACT_FILE).stat().st_size
    assert report["summary"]["compact_file_bytes"] == compact_bytes
    assert compact_bytes < (source / "adapter_model.safetensors").stat().st_size  # headers dominate at this size
    # the tensors themselves: 1 mask bit per entry + (1 sign bit | 1 byte) per kept entry + scales, vs 4 bytes
    assert report["summary"]["ratio"] > (15 if bits == "ternary" else 5)  # int8: lora_B has a scale per row of r=8
    assert json.loads((out / "adapter_config.json").read_text())["r"] == config["r"]
    model = PeftModel.from_pretrained(tiny_llama(0), out)  # the PEFT file is a normal adapter
    loaded = dict(model.named_parameters())
    some = next(k for k in peft_tensors if "lora_B" in k)
    assert torch.equal(loaded[some.replace(".weight", ".default.weight")], peft_tensors[some])
