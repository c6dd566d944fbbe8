"""Reading a model for `rain` (see `rain.py`): marker positions and their neighbourhoods, forward hooks,
eager attention (the only implementation that returns attention probabilities), and the geometry of a
Llama-shaped attention block (heads, K/V heads, head size, its four projections, the rotary embedding)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from workers.engines.merge.errors import MergeInputError


def marker_positions(ids: Tensor, markers: tuple[int, int]) -> tuple[int, int] | None:
    """(t_s, t_e) when `ids` holds exactly one start and one end marker, the start first; else None."""
    starts = (ids == markers[0]).nonzero().flatten().tolist()
    ends = (ids == markers[1]).nonzero().flatten().tolist()
    if len(starts) != 1 or len(ends) != 1 or starts[0] >= ends[0]:
        return None
    return int(starts[0]), int(ends[0])


def neighbourhoods(t_s: int, t_e: int, radius: int, length: int) -> tuple[list[int], list[int]]:
    """N_s = t_s … t_s + radius and N_e = t_e − radius … t_e, within the row."""
    return list(range(t_s, min(t_s + radius, length - 1) + 1)), list(range(max(t_e - radius, 0), t_e + 1))


@contextmanager
def hooks(
    model: nn.Module, pre: dict[str, Callable[..., None]], post: dict[str, Callable[..., None]]
) -> Iterator[None]:
    handles = []
    try:
        for name, function in pre.items():
            handles.append(model.get_submodule(name).register_forward_pre_hook(function))
        for name, function in post.items():
            handles.append(model.get_submodule(name).register_forward_hook(function))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Attention probabilities are only returned by the eager implementation (SDPA returns none)."""
    config: Any = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", "eager")
    switch: Any = getattr(model, "set_attn_implementation", None)
    if before != "eager" and switch is not None:
        switch("eager")
    try:
        yield
    finally:
        if before != "eager" and switch is not None:
            switch(before)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def weight_of(model: nn.Module, name: str) -> Tensor:
    weight = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(weight, Tensor):
        raise MergeInputError(f"module {name!r} has no weight matrix")
    return weight.detach().float()



def rotate_half(v: Tensor) -> Tensor:
    half = v.shape[-1] // 2
    return torch.cat((-v[..., half:], v[..., :half]), dim=-1)


def rotary(model: nn.Module, length: int, width: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """(cos, sin), each (T, head_dim), of the model's rotary embedding; None when it has none."""
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        return None
    positions = torch.arange(length, device=device).unsqueeze(0)
    cos, sin = rotary(torch.zeros(1, length, width, device=device), positions)
    return cos[0].float(), sin[0].float()
@dataclass
class AttentionBlock:
    """One layer's attention geometry and the module names of its projections."""

    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    q: str
    k: str
    v: str
    o: str


def attention_of(model: nn.Module, name: str) -> AttentionBlock | None:
    """The attention block `name` (a q/k/v/o projection) belongs to, when it is Llama-shaped."""
    parent, _, kind = name.rpartition(".")
    if kind not in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return None
    try:
        block = model.get_submodule(parent)
        for sibling in ("q_proj", "k_proj", "v_proj", "o_proj"):
            model.get_submodule(f"{parent}.{sibling}")
    except AttributeError:
        return None
    config: Any = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    layer = getattr(block, "layer_idx", None)
    head_dim = getattr(block, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(layer, int) or not isinstance(head_dim, int):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return AttentionBlock(layer, heads, int(kv_heads), head_dim, *(f"{parent}.{s}" for s in ("q_proj", "k_proj",
                                                                                         "v_proj", "o_proj")))

