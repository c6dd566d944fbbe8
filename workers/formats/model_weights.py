"""A Hugging Face model folder's weights, read one tensor at a time, and what kind of layer owns each weight.

`ModelWeights` indexes every `*.safetensors` file of a folder (sharded or not) by tensor name and reads one
tensor on demand (safetensors' `safe_open`), so two 7B models can be diffed module by module without
either being loaded. `model_layers` instantiates the architecture from `config.json` on the meta device (no
memory, no weights, never custom code) to learn which weights belong to linear layers, GPT-2-style Conv1D
layers (stored (in, out)), embeddings and the output head, and whether that head is tied to the input
embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from workers.formats.hf_models import HfFormatError

LayerKind = Literal["linear", "conv1d", "embedding"]


class ModelWeights:
    """Tensor name -> file over a folder's safetensors files; `read` loads one tensor."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        for path in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    self._files[key] = path
                    self._shapes[key] = tuple(int(d) for d in view.get_shape())
                    self._dtypes[key] = str(view.get_dtype())
        if not self._files:
            raise HfFormatError(f"{self.directory.name}: no safetensors weights")

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> str:
        """The safetensors dtype name (F32, BF16, ...)."""
        return self._dtypes[key]

    def read(self, key: str) -> torch.Tensor:
        with safe_open(str(self._files[key]), framework="pt") as handle:
            return handle.get_tensor(key)


@dataclass(frozen=True)
class Layer:
    """A layer with a 2-D weight: its kind, the weight's name in the files, and whether it is the output
    head (`tied` when that head shares the input embedding's weight)."""

    kind: LayerKind
    weight: str
    output_head: bool = False
    tied: bool = False


def model_layers(directory: Path, weights: ModelWeights) -> dict[str, Layer]:
    """Every linear, Conv1D and embedding layer of the model in `directory`, by module name (PEFT's names)."""
    import transformers
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    raw = json.loads((Path(directory) / "config.json").read_text())
    if "auto_map" in raw:
        raise HfFormatError("the model's config needs custom code (auto_map); Amend never runs it")
    architecture = (raw.get("architectures") or [""])[0]
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise HfFormatError(f"architecture {architecture!r} is not one transformers provides")
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    with torch.device("meta"):
        model = model_class(config)
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    layers: dict[str, Layer] = {}
    for name, module in model.named_modules():
        kind: LayerKind | None = (
            "conv1d" if isinstance(module, Conv1D)
            else "linear" if isinstance(module, nn.Linear)
            else "embedding" if isinstance(module, nn.Embedding)
            else None
        )
        if kind is None:
            continue
        key = f"{name}.weight"
        if key not in weights and key.startswith(prefix) and key.removeprefix(prefix) in weights:
            key = key.removeprefix(prefix)
        is_head = module is head
        tied = is_head and embedding is not None and module.weight is embedding.weight
        layers[name] = Layer(kind=kind, weight=key, output_head=is_head, tied=tied)
    return layers
