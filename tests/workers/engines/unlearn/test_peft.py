"""Unlearning through a LoRA adapter changes only the adapter, and the result saves and loads with peft."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from workers.engines.unlearn import unlearn


@pytest.mark.parametrize("method", ["npo", "retrain"])
def test_peft_unlearning_changes_only_lora_and_round_trips(method, trained_lm, lm_data, tokenizer, tmp_path):
    base = copy.deepcopy(trained_lm)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=True)
    model = get_peft_model(base, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = {"lr": 1e-2, "steps": 20} if method == "npo" else {"lr": 1e-2, "steps": 10, "batch_size": 24}
    out = unlearn(model, "causal_lm", method, params, lm_data["forget"], lm_data["retain"], tokenizer=tokenizer)
    assert out.report["peft"] is True
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(p.detach(), before[name]), name
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    if method == "npo":
        assert out.report["after"]["forget_nll"] > out.report["before"]["forget_nll"]

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(trained_lm), tmp_path).eval()
    batch = lm_data["forget"].collate(range(4))
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        actual = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(expected, actual, atol=1e-5)
