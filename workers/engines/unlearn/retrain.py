"""`retrain`: the gold standard — re-initialise and train on the retain set only (both families).

A full model is re-initialised with its own `_init_weights` (transformers) or each module's
`reset_parameters`; a PeftModel gets a freshly initialised LoRA adapter on the same base. Used as the
reference that evaluations and benchmarks compare unlearning methods against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from app.schemas.unlearn import RetrainParams
from workers.engines.registry import register
from workers.engines.unlearn.loop import Objective, UnlearnContext


def reinitialize(model: nn.Module, is_peft: bool) -> None:
    """Fresh initial weights: the LoRA factors of a PeftModel, else every module of the model. Initialisers
    that build tensors without naming a device (transformers' rotary buffers) build them on the model's."""
    device = next(model.parameters()).device
    with torch.no_grad(), torch.device(device):
        if is_peft:
            for module in model.modules():
                reset: Any = getattr(module, "reset_lora_parameters", None)
                adapters: Any = getattr(module, "lora_A", None)
                if callable(reset) and isinstance(adapters, nn.ModuleDict):
                    for adapter in list(adapters.keys()):
                        reset(adapter, True)
        elif callable(init := getattr(model, "_init_weights", None)):
            # transformers 5 marks every tensor `from_pretrained` loaded (and its modules) `_is_hf_initialized`,
            # and its initialisers skip what is marked: unmarked, the loaded weights are drawn afresh
            items: tuple[Any, ...] = (*model.modules(), *model.parameters(), *model.buffers())
            for item in items:
                if getattr(item, "_is_hf_initialized", False):
                    item._is_hf_initialized = False
            model.apply(init)
        else:
            for module in model.modules():
                reset_parameters: Any = getattr(module, "reset_parameters", None)
                if callable(reset_parameters):
                    reset_parameters()


@register("unlearn", "retrain", RetrainParams)
def retrain(ctx: UnlearnContext, params: RetrainParams) -> Objective:
    ctx.need_retain()
    if params.reinitialize:
        reinitialize(ctx.model, ctx.is_peft)
    return Objective(retain_loss=lambda model, batch, step: ctx.task_loss(model, batch))
