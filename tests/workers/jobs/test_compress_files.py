"""Compression file to file: PEFT adapters with rsLoRA, rank and alpha patterns in; PEFT adapters out that
`peft` loads and that change the model as the report says."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from app.schemas.compress import CompressOutput
from tests.factories import tiny_llama
from workers.engines.compress.errors import CompressInputError
from workers.jobs.compress_files import compress_adapter_files

TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def patterned_adapter(directory):
    """rsLoRA, r=8 with q_proj at rank 4 (rank_pattern) and v_proj's alpha 32 (alpha_pattern)."""
    torch.manual_seed(7)
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                        rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 32}, init_lora_weights=False)
    model = get_peft_model(tiny_llama(0), config)
    model.save_pretrained(directory)
    return json.loads((directory / "adapter_config.json").read_text())


def logits(directory):
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(0), directory)(TOKENS).logits


def test_scaling_is_folded_once_and_the_output_changes_the_model_as_the_input_does(tmp_path):
    config = patterned_adapter(tmp_path / "in")
    report = compress_adapter_files(config, tmp_path / "in" / "adapter_model.safetensors", "rank_reduce", {},
                                    CompressOutput(energy=1.0), tmp_path / "out")
    assert report["summary"]["rel_error"] < 1e-5
    out = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert out["use_rslora"] is False and out["lora_alpha"] == out["r"] == 8
    assert out["rank_pattern"] == out["alpha_pattern"]
    assert {k.rsplit(".", 1)[-1]: v for k, v in out["rank_pattern"].items()} == {"q_proj": 4}
    torch.testing.assert_close(logits(tmp_path / "out"), logits(tmp_path / "in"), atol=1e-5, rtol=1e-5)


def test_a_truncation_changes_the_model_by_about_its_stated_error(tmp_path):
    config = patterned_adapter(tmp_path / "in")
    report = compress_adapter_files(config, tmp_path / "in" / "adapter_model.safetensors", "rank_reduce", {},
                                    CompressOutput(rank=2), tmp_path / "out")
    assert 0.05 < report["summary"]["rel_error"] < 1
    assert not torch.allclose(logits(tmp_path / "out"), logits(tmp_path / "in"), atol=1e-4)


def test_cast_keeps_the_config_and_peft_loads_the_bf16_factors(tmp_path):
    config = patterned_adapter(tmp_path / "in")
    report = compress_adapter_files(config, tmp_path / "in" / "adapter_model.safetensors", "cast", {"dtype": "bf16"},
                                    CompressOutput(), tmp_path / "out")
    out = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert {k: out[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")} == {
        k: config[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")}
    assert 0 < report["summary"]["max_rel_error"] < 2**-7
    torch.testing.assert_close(logits(tmp_path / "out"), logits(tmp_path / "in"), atol=5e-3, rtol=5e-3)


def test_dropped_modules_are_left_out_of_target_modules(tmp_path, adapter_dir):
    source = adapter_dir("in", seed=1, r=4, targets=("q_proj", "up_proj"))
    config = json.loads((source / "adapter_config.json").read_text())
    # one rank step of a 32×32 q_proj (64 parameters) fits; a 48×32 up_proj step (80) does not fit beside it
    report = compress_adapter_files(config, source / "adapter_model.safetensors", "rank_reduce", {},
                                    CompressOutput(budget_params=64 * 2 + 10), tmp_path / "out")
    out = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    kept = sorted(name for name, row in report["modules"].items() if row["rank_out"])
    assert out["target_modules"] == kept and len(kept) < 4 and report["summary"]["dropped"] == 4 - len(kept)
    model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out")
    wrapped = {name for name, _ in model.named_modules() if name.endswith(("q_proj", "up_proj"))
               and hasattr(dict(model.named_modules())[name], "lora_A")}
    assert {name.removeprefix("base_model.model.") for name in wrapped} == set(kept)


def test_unknown_params_are_refused_before_any_compute(tmp_path, adapter_dir):
    source = adapter_dir("in")
    config = json.loads((source / "adapter_config.json").read_text())
    with pytest.raises(CompressInputError, match="density"):
        compress_adapter_files(config, source / "adapter_model.safetensors", "sparsify_quantize",
                               {"density": 2}, CompressOutput(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
