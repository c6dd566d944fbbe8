"""`rmu`: Representation Misdirection for Unlearning (Li et al. 2024, WMDP, arXiv 2403.03218).

L = MSE(h_θ(x_f), c·u) + α·MSE(h_θ(x_r), h_θ0(x_r)) at the output of decoder layer `layer`, u a fixed random
unit vector; only parameters of `trained_layers` (default layer−2 … layer) whose name contains
`trained_module` are trained (in a PeftModel: the LoRA parameters there).
"""

from __future__ import annotations

import re

import torch

from app.schemas.unlearn import RmuParams
from workers.engines.registry import register
from workers.engines.unlearn.data import to_device
from workers.engines.unlearn.errors import UnlearnError
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import hidden_states_at, masked_mse

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.*)$")


def _selected(name: str, layers: set[int], module: str) -> bool:
    match = _LAYER.search(name)
    if match is None:
        return False
    return int(match.group(1)) in layers and module in match.group(2)


@register("unlearn", "rmu", RmuParams)
def rmu(ctx: UnlearnContext, params: RmuParams) -> Objective:
    forget = ctx.need_forget()
    ctx.need_retain()
    with torch.no_grad():
        probe = to_device(forget.collate([0]), ctx.device)
        out = ctx.model(
            input_ids=probe["input_ids"],
            attention_mask=probe["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
        )
    n_layers = len(out.hidden_states) - 1
    if params.layer >= n_layers:
        raise UnlearnError(f"rmu layer {params.layer} out of range: the model has {n_layers} layers")
    layers = set(params.trained_layers or range(max(0, params.layer - 2), params.layer + 1))
    trainable = [(n, p) for n, p in ctx.trainable if _selected(n, layers, params.trained_module)]
    if not trainable:
        raise UnlearnError(f"rmu: no trainable parameter in layers {sorted(layers)} matches {params.trained_module!r}")
    hidden = out.hidden_states[params.layer + 1].shape[-1]
    direction = torch.rand(hidden, generator=ctx.generator, device=ctx.generator.device).to(ctx.device)
    control = params.steering_coeff * direction / direction.norm()
    reference = ctx.reference()

    def forget_loss(model, batch, step):
        h = hidden_states_at(model, batch, params.layer)
        return masked_mse(h, control.expand_as(h), batch["attention_mask"])

    def retain_loss(model, batch, step):
        h = hidden_states_at(model, batch, params.layer)
        with torch.no_grad():
            h_ref = hidden_states_at(reference, batch, params.layer)
        return params.alpha * masked_mse(h, h_ref, batch["attention_mask"])

    return Objective(
        forget_loss=forget_loss,
        retain_loss=retain_loss,
        trainable=trainable,
        report={"rmu_trained_parameters": len(trainable)},
    )
