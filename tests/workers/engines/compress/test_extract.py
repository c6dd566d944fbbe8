"""extract: the randomized range finder against the exact SVD, and a LoRA recovered from two real tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from app.schemas.compress import CompressOutput, ExtractParams
from tests.factories import tiny_llama
from workers.engines.compress.errors import CompressInputError
from workers.engines.compress.extract import extract, range_finder_svd
from workers.engines.compress.types import ExtractJob, SizeRule, WeightDelta
from workers.jobs.compress_files import NOT_CAPTURED_REASONS, extract_model_files


def spectrum_matrix(m: int, n: int, seed: int = 0, decay: float = 0.8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g)).Q
    s = decay ** torch.arange(min(m, n), dtype=torch.float32) + 1e-3
    return (u * s) @ v.mT


def optimal_error(d: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(d.double())
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def run_extract(d: torch.Tensor, size: SizeRule, **params):
    job = ExtractJob(modules={"w": (d.shape[0], d.shape[1], torch.float32)},
                     delta=lambda name: WeightDelta(delta=d.clone(), base_norm=1.0), size=size)
    return extract(job, ExtractParams(**params))


def test_randomized_range_finder_is_within_one_percent_of_the_optimal_error():
    d = spectrum_matrix(300, 420)
    u, s, vh = range_finder_svd(d, 16 + 16, 2, torch.Generator().manual_seed(0))
    assert u.shape == (300, 32)  # the randomized path, not the exact fallback
    result = run_extract(d, SizeRule(rank=16))
    row = result.report["modules"]["w"]
    assert row["rank_out"] == 16
    assert row["rel_error"] <= 1.01 * optimal_error(d, 16)
    approx = result.modules["w"].lora_B.double() @ result.modules["w"].lora_A.double()
    assert row["rel_error"] == pytest.approx(float((d.double() - approx).norm() / d.double().norm()), rel=1e-4)


def test_energy_grows_the_sketch_until_it_holds_the_fraction():
    d = spectrum_matrix(300, 420, decay=0.985)  # slow decay: rank ~76 for 0.9
    s2 = torch.linalg.svdvals(d.double()).square()
    needed = int(((s2.cumsum(0) / s2.sum()) < 0.9).sum()) + 1
    assert needed > 32 + 16  # more than the first sketch holds
    row = run_extract(d, SizeRule(energy=0.9)).report["modules"]["w"]
    assert needed <= row["rank_out"] <= needed + 2  # the sketch's σ are slightly below the true ones
    assert row["energy_kept"] >= 0.9 - 1e-6


def test_an_unchanged_module_is_skipped_and_listed():
    job = ExtractJob(modules={"same": (8, 8, torch.float32), "moved": (8, 8, torch.float32)},
                     delta=lambda name: WeightDelta(delta=torch.zeros(8, 8) if name == "same" else torch.eye(8),
                                                    base_norm=3.0), size=SizeRule(rank=2))
    result = extract(job, ExtractParams())
    assert set(result.modules) == {"moved"} and list(result.report["skipped"]) == ["same"]
    assert result.dropped == ["same"]


def _save_pair(root, change):
    """A base tiny Llama and a copy changed by `change(model)` (returns the true updates)."""
    base = tiny_llama(0)
    base.save_pretrained(root / "base")
    tuned = tiny_llama(0)
    with torch.no_grad():
        truth = change(tuned)
    tuned.save_pretrained(root / "tuned")
    return tuned, truth


def _low_rank_updates(model, names=("q_proj", "down_proj"), rank=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    truth = {}
    for name, module in model.named_modules():
        if name.endswith(names):
            m, n = module.weight.shape
            update = (torch.randn(m, rank, generator=g) * 0.05) @ (torch.randn(rank, n, generator=g) * 0.05)
            module.weight += update
            truth[name] = update
    return truth


def test_known_low_rank_updates_are_recovered_at_their_rank(tmp_path):
    from peft import PeftModel

    tuned, truth = _save_pair(tmp_path, _low_rank_updates)
    report = extract_model_files(tmp_path / "base", tmp_path / "tuned", "md_base", "CAUSAL_LM",
                                 {"target_modules": ["q_proj", "v_proj", "down_proj"]}, CompressOutput(rank=3),
                                 tmp_path / "out")
    assert set(report["modules"]) == set(truth)
    for row in report["modules"].values():
        assert row["rank_out"] == 3 and row["rel_error"] <= 1e-5
    assert sorted(report["skipped"]) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert report["summary"]["not_captured"] == 0 and report["summary"]["rel_error"] <= 1e-5
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "md_base" and config["target_modules"] == sorted(truth)
    assert config["r"] == config["lora_alpha"] == 3
    model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, tuned(tokens).logits, atol=1e-5, rtol=1e-5)


def test_embeddings_norms_and_untargeted_head_are_listed_not_captured(tmp_path):
    def change(model):
        truth = _low_rank_updates(model, names=("q_proj",))
        model.model.embed_tokens.weight[:4] += 0.05
        model.model.norm.weight += 0.01
        model.lm_head.weight[:2] += 0.05
        return truth

    _save_pair(tmp_path, change)
    report = extract_model_files(tmp_path / "base", tmp_path / "tuned", "md_base", "CAUSAL_LM",
                                 {"target_modules": ["q_proj", "embed_tokens"]}, CompressOutput(rank=3),
                                 tmp_path / "out")
    lost = report["not_captured"]
    assert set(lost) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert lost["model.embed_tokens.weight"]["reason"] == NOT_CAPTURED_REASONS["embedding"]
    assert lost["model.norm.weight"]["reason"] == NOT_CAPTURED_REASONS["other"]
    assert lost["lm_head.weight"]["reason"] == NOT_CAPTURED_REASONS["head"]
    assert 0 < report["summary"]["not_captured_energy_fraction"] < 1
    # named explicitly, the (untied) head is extracted like any linear layer
    report = extract_model_files(tmp_path / "base", tmp_path / "tuned", "md_base", "CAUSAL_LM",
                                 {"target_modules": ["q_proj", "lm_head"]}, CompressOutput(energy=1.0),
                                 tmp_path / "out2")
    assert "lm_head" in report["modules"] and report["modules"]["lm_head"]["rel_error"] < 1e-5
    assert "lm_head.weight" not in report["not_captured"]


def test_gpt2_conv1d_layers_are_extracted_in_peft_orientation(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config).eval()
    base.save_pretrained(tmp_path / "base")
    tuned = GPT2LMHeadModel(config).eval()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        attn = tuned.transformer.h[0].attn.c_attn  # Conv1D: weight is (in 32, out 96)
        attn.weight += (torch.randn(32, 2, generator=g) * 0.1) @ (torch.randn(2, 96, generator=g) * 0.1)
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract_model_files(tmp_path / "base", tmp_path / "tuned", "md_base", "CAUSAL_LM",
                                 {"target_modules": ["c_attn"]}, CompressOutput(rank=2), tmp_path / "out")
    assert report["modules"]["transformer.h.0.attn.c_attn"]["shape"] == [96, 32]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "out")
    tokens = torch.randint(0, 64, (1, 10), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, tuned(tokens).logits, atol=1e-5, rtol=1e-5)


def test_a_target_the_model_lacks_is_refused(tmp_path):
    _save_pair(tmp_path, _low_rank_updates)
    with pytest.raises(CompressInputError, match="qproj"):
        extract_model_files(tmp_path / "base", tmp_path / "tuned", "md_base", None, {"target_modules": ["qproj"]},
                            CompressOutput(), tmp_path / "out")
