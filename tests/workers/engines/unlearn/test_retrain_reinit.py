"""`retrain` re-initialises a model loaded with `from_pretrained` (as every job loads it): transformers 5 marks
each loaded tensor `_is_hf_initialized` and its initialisers skip marked tensors, so `model.apply(_init_weights)`
alone left every weight as loaded, and `retrain` (and the `reference: "retrain"` it backs) only fine-tuned the
input on the retain rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from tests.factories import tiny_llama
from workers.engines.unlearn.retrain import reinitialize


def _vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=4)
    return ViTForImageClassification(config)


@pytest.mark.parametrize("make, auto", [(_vit, AutoModelForImageClassification),
                                        (lambda: tiny_llama(0), AutoModelForCausalLM)])
def test_every_weight_matrix_of_a_loaded_model_is_drawn_afresh(tmp_path, make, auto) -> None:
    with torch.no_grad():
        trained = make()
        for parameter in trained.parameters():
            parameter.add_(1.0)  # "trained": far from any initialisation (norms and biases included)
    trained.save_pretrained(tmp_path)
    model = auto.from_pretrained(tmp_path)
    loaded = {name: p.detach().clone() for name, p in model.named_parameters()}
    reinitialize(model, is_peft=False)
    kept = [name for name, p in model.named_parameters() if torch.equal(p, loaded[name])]
    assert kept == [], f"left as loaded: {kept}"
    assert all(torch.isfinite(p).all() for p in model.parameters())
