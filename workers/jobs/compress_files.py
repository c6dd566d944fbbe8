"""Compression file to file (no storage): a PEFT adapter, or two model folders, in; a PEFT adapter out.

`compress_adapter_files` reads an adapter's factors and PEFT scalings (`workers/formats/lora.py`), runs the
registered method and writes `adapter_model.safetensors` + `adapter_config.json` (loadable with
`PeftModel.from_pretrained`), plus `adapter_model.compact.safetensors` when the method stores a compact form.
`extract_model_files` streams two models' weights module by module (`workers/formats/model_weights.py`)
into `extract`, and lists every weight that changed but is not in the LoRA. Both return the report.
The engines run on `device` (the worker's, `workers/device.py`): the factors or each module's difference are
moved there, and the results come back to the CPU to be written.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from app.checks.peft_patterns import PeftPattern
from app.schemas.compress import CompressOutput
from workers.engines import registry
from workers.engines.compress.errors import CompressInputError
from workers.engines.compress.types import (
    AdapterModule,
    CompressJob,
    CompressResult,
    ExtractJob,
    SizeRule,
    WeightDelta,
)
from workers.formats.compact import COMPACT_FILE, write_compact
from workers.formats.lora import PREFIX, read_lora_modules
from workers.formats.model_weights import Layer, ModelWeights, model_layers
from workers.formats.tensor_files import DTYPES, write_tensors

Progress = Callable[[float, str], None]
# config keys that restrict which layers PEFT wraps: replaced by exact module names when modules are dropped
_RESTRICTING = ("layers_to_transform", "layers_pattern", "exclude_modules")


def size_rule(output: CompressOutput, bytes_per_param: int) -> SizeRule:
    budget = output.budget_params
    if output.budget_bytes is not None:
        budget = output.budget_bytes // bytes_per_param
    pattern = PeftPattern.compile(output.rank_pattern, "rank_pattern") if output.rank_pattern else None
    return SizeRule(rank=output.rank, pattern=pattern, energy=output.energy, budget_params=budget)


def _validated(method: str, params: Mapping[str, Any]) -> Any:
    entry = registry.get("compress", method)
    try:
        return entry, entry.params_model.model_validate(dict(params))
    except ValidationError as error:
        raise CompressInputError(f"invalid {method} params: {error}") from None


def compress_adapter_files(
    config: dict[str, Any],
    weights: Path,
    method: str,
    params: Mapping[str, Any],
    output: CompressOutput,
    out_dir: Path,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Compress one PEFT adapter with the registered `method` on `device`; writes the output adapter into
    `out_dir`."""
    entry, checked = _validated(method, params)
    modules = {name: AdapterModule(lora_A=a.to(device), lora_B=b.to(device), scaling=s)
               for name, (a, b, s) in read_lora_modules(config, weights).items()}
    widths = {module.lora_A.element_size() for module in modules.values()}
    job = CompressJob(modules=modules, size=size_rule(output, widths.pop() if len(widths) == 1 else 4))
    if progress is not None:
        job.progress = progress
    result: CompressResult = entry.function(job, checked)
    if not result.modules:
        raise CompressInputError("the output keeps no module: every module's update is zero")
    out_config = _output_config(config, result, list(modules))
    return _write(out_dir, result, out_config, method)


def _output_config(config: dict[str, Any], result: CompressResult, names: list[str]) -> dict[str, Any]:
    out = dict(config)
    if result.dropped:  # PEFT must wrap exactly the kept modules
        out["target_modules"] = sorted(result.modules)
        for key in _RESTRICTING:
            out.pop(key, None)
    if result.config == "keep":
        return out
    ranks = {name: module.rank for name, module in result.modules.items()}
    counts = Counter(ranks.values())
    r = max(counts.items(), key=lambda item: (item[1], -item[0]))[0]
    pattern = {name: k for name, k in ranks.items() if k != r}
    out.update(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False)
    return out


def _write(out_dir: Path, result: CompressResult, config: dict[str, Any], method: str) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    compact = {}
    for name, module in result.modules.items():
        for side, tensor in (("lora_A", module.lora_A), ("lora_B", module.lora_B)):
            tensors[f"{PREFIX}{name}.{side}.weight"] = tensor.cpu().contiguous()
            if module.stored is not None:
                compact[f"{PREFIX}{name}.{side}"] = module.stored[side].to("cpu")
    write_tensors(out_dir / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    report = dict(result.report)
    summary = {"method": method, **report.pop("summary")}
    summary["dropped"] = len(result.dropped)
    summary["peft_file_bytes"] = (out_dir / "adapter_model.safetensors").stat().st_size
    if compact:
        first = next(iter(compact.values()))
        write_compact(out_dir / COMPACT_FILE, compact, first.bits, float(report.get("density", 1.0)))
        summary["compact_file_bytes"] = (out_dir / COMPACT_FILE).stat().st_size
    return {"summary": summary, **report}


# -- extract ------------------------------------------------------------------------------------------------

NOT_CAPTURED_REASONS = {
    "embedding": "an embedding: embedding LoRA (lora_embedding_A/B) is not an adapter Amend stores",
    "tied": "the output head shares the input embedding's weight (tied); its change is the embedding's",
    "head": "the output head: extracted only when 'lm_head' (its name) is in target_modules",
    "other": "not a 2-D weight of a linear layer (a norm, bias or buffer): LoRA cannot carry it",
    "untargeted": "a linear layer outside target_modules",
}


def _targets(layers: Mapping[str, Layer], target_modules: str | list[str]) -> tuple[list[str], dict[str, str]]:
    """(LoRA targets, {named target module that cannot be one: reason}) for PEFT's suffix rule."""
    if target_modules == "all-linear":
        return [n for n, layer in layers.items() if layer.kind != "embedding" and not layer.output_head], {}
    chosen, refused = [], {}
    for wanted in target_modules:
        hits = [n for n in layers if n == wanted or n.endswith("." + wanted)]
        if not hits:
            raise CompressInputError(f"target module {wanted!r} matches no linear or embedding layer of the model")
        for name in hits:
            layer = layers[name]
            if layer.kind == "embedding":
                refused[name] = NOT_CAPTURED_REASONS["embedding"]
            elif layer.tied:
                refused[name] = NOT_CAPTURED_REASONS["tied"]
            elif name not in chosen:
                chosen.append(name)
    return chosen, refused


def _reason(name: str, layers: Mapping[str, Layer], by_weight: Mapping[str, str]) -> str:
    layer = layers.get(by_weight.get(name, ""))
    if layer is None:
        return NOT_CAPTURED_REASONS["other"]
    if layer.kind == "embedding":
        return NOT_CAPTURED_REASONS["embedding"]
    if layer.output_head:
        return NOT_CAPTURED_REASONS["head"]
    return NOT_CAPTURED_REASONS["untargeted"]


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype != torch.float32 else tensor


def extract_model_files(
    base_dir: Path,
    tuned_dir: Path,
    base_model_id: str,
    task_type: str | None,
    params: Mapping[str, Any],
    output: CompressOutput,
    out_dir: Path,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Extract a LoRA of `tuned_dir − base_dir` (two model folders) on `device` into `out_dir`; see the module
    docstring."""
    entry, checked = _validated("extract", params)
    base, tuned = ModelWeights(base_dir), ModelWeights(tuned_dir)
    for key in sorted(set(base.keys()) | set(tuned.keys())):
        if key not in base or key not in tuned or base.shape(key) != tuned.shape(key):
            raise CompressInputError(f"weight {key!r} differs in presence or shape between the two models")
    layers = model_layers(tuned_dir, tuned)
    targets, refused = _targets(layers, checked.target_modules)
    missing = [n for n in targets if layers[n].weight not in tuned]
    if missing:
        raise CompressInputError(f"module {missing[0]!r} has no weight {layers[missing[0]].weight!r} in the files")
    modules: dict[str, tuple[int, int, torch.dtype]] = {}
    for name in targets:
        rows, cols = tuned.shape(layers[name].weight)
        m, n = (cols, rows) if layers[name].kind == "conv1d" else (rows, cols)  # Conv1D stores (in, out)
        modules[name] = (m, n, DTYPES.get(tuned.dtype(layers[name].weight), torch.float32))

    def delta(name: str) -> WeightDelta:
        layer = layers[name]
        w_base = _float(base.read(layer.weight))
        change = _float(tuned.read(layer.weight)).sub_(w_base)
        if layer.kind == "conv1d":
            change = change.mT.contiguous()
        return WeightDelta(delta=change.to(device),
                           base_norm=float(torch.linalg.vector_norm(w_base, dtype=torch.float64)))

    job = ExtractJob(modules=modules, delta=delta, size=size_rule(output, 4), device=torch.device(device))
    if progress is not None:
        job.progress = lambda fraction, stage: progress(0.9 * fraction, stage)
    result: CompressResult = entry.function(job, checked)
    if not result.modules:
        raise CompressInputError("no target module changed between the two models: there is nothing to extract")
    # every other weight that changed, and why the LoRA does not carry it
    captured = {layers[name].weight for name in targets}
    by_weight = {layer.weight: name for name, layer in layers.items()}
    not_captured: dict[str, dict[str, Any]] = {}
    lost2 = 0.0
    for key in tuned.keys():
        if key in captured:
            continue
        w_base = _float(base.read(key))
        diff = float(torch.linalg.vector_norm(_float(tuned.read(key)) - w_base, dtype=torch.float64))
        if diff > 0.0:
            layer_name = by_weight.get(key, "")
            reason = refused.get(layer_name) or _reason(key, layers, by_weight)
            base_norm = float(torch.linalg.vector_norm(w_base, dtype=torch.float64))
            not_captured[key] = {"relative_change": diff / base_norm if base_norm else None, "reason": reason}
            lost2 += diff * diff
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_id,
        "target_modules": sorted(result.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layers[n].kind == "conv1d" for n in result.modules),
        "modules_to_save": None,
        "inference_mode": True,
        "use_dora": False,
    }
    config = _output_config(config, result, targets)
    report = _write(out_dir, result, config, "extract")
    total2 = sum(float(row["change_norm"]) ** 2 for row in report["modules"].values()) + lost2
    report["summary"]["not_captured"] = len(not_captured)
    report["summary"]["not_captured_energy_fraction"] = lost2 / total2 if total2 else 0.0
    report["not_captured"] = not_captured
    return report
