"""PEFT LoRA adapter files <-> per-module factors (A, B with weight·scaling folded in). No storage clients here.

`read_adapter_factors` reads an `adapter_model.safetensors` lazily, one tensor at a time (safe_open),
normalises module names (PEFT's `base_model.model.` prefix and `.lora_A.weight` suffix stripped), and folds
the per-module scaling — lora_alpha/r, or lora_alpha/√r with rsLoRA, honouring `rank_pattern` and
`alpha_pattern` with PEFT's key matching (`app.checks.peft_patterns`) — and the job's weight into lora_B,
in float32. PEFT stores LoRA factors of fan_in_fan_out (GPT-2 Conv1D) layers already in the (out, in)
orientation — only the delta weight is transposed to the layer's layout — so the factors need no transpose
either way.

`merge_adapter_files` is the file-to-file merge the pipeline calls: validate, check base models and shapes
before any compute, read, merge with `workers.engines.merge.engine.merge_modules`, write a PEFT adapter
(`adapter_model.safetensors` + `adapter_config.json`, loadable with `PeftModel.from_pretrained`) and a
`merge_report.json`, and return the report.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open

from app.checks.peft_patterns import PatternError, PeftPattern
from app.schemas.merge import MergeOutput
from workers.engines import registry
from workers.engines.merge.core_space import batches
from workers.engines.merge.engine import merge_modules
from workers.engines.merge.errors import MergeInputError
from workers.engines.merge.types import TaskFactors, finite
from workers.formats.prefetch import Prefetching
from workers.formats.tensor_files import DTYPES, Arrival, TensorFile, write_tensors

PREFIX = "base_model.model."
READ_AHEAD = 32  # modules read ahead of the merge (one engine batch)
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")


class AdapterFormatError(ValueError):
    """The adapter files cannot be read as a plain LoRA adapter; the message says what and where."""


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse what is not a plain LoRA: other PEFT types, DoRA, LoRA biases."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(f"peft_type {peft_type!r} is not supported; only LORA adapters can be merged")
    if config.get("use_dora"):
        raise AdapterFormatError("DoRA adapters (use_dora) are not supported: their magnitude vector cannot be merged")
    if config.get("lora_bias"):
        raise AdapterFormatError("adapters with lora_bias are not supported: the bias terms cannot be merged")


def module_name(key: str) -> str:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` -> `model.layers.0.q_proj`."""
    match = _KEY.match(key)
    name = match.group("module") if match else key
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def _pairs(keys: Sequence[str], where: str) -> dict[str, dict[str, str]]:
    pairs: dict[str, dict[str, str]] = {}
    for key in keys:
        if "lora_embedding_" in key:
            raise AdapterFormatError(f"{where}: embedding LoRA module {key!r} is not supported")
        if "lora_magnitude_vector" in key:
            raise AdapterFormatError(f"{where}: DoRA magnitude vector {key!r} is not supported")
        match = _KEY.match(key)
        if match is None:
            if ".lora_" in key and key.endswith(".bias"):
                raise AdapterFormatError(f"{where}: LoRA bias {key!r} is not supported (lora_bias)")
            raise AdapterFormatError(
                f"{where}: tensor {key!r} is not a LoRA factor (modules_to_save and other tensors cannot be merged)"
            )
        pairs.setdefault(module_name(key), {})[match.group("side")] = key
    for name, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            raise AdapterFormatError(f"{where}: module {name!r} has no {missing} weight")
    return pairs


def adapter_shapes(weights_path: Path) -> dict[str, tuple[int, int, int, str]]:
    """(m, n, r, dtype) per module, from the safetensors header only (no tensor is read)."""
    where = str(Path(weights_path).name)
    out: dict[str, tuple[int, int, int, str]] = {}
    with safe_open(str(weights_path), framework="pt") as handle:
        for name, sides in _pairs(list(handle.keys()), where).items():
            a, b = handle.get_slice(sides["A"]), handle.get_slice(sides["B"])
            shape_a, shape_b = list(a.get_shape()), list(b.get_shape())
            if len(shape_a) != 2 or len(shape_b) != 2:
                raise AdapterFormatError(
                    f"{where}: module {name!r} has {len(shape_a)}-D LoRA weights (conv layers are not supported)"
                )
            if shape_a[0] != shape_b[1]:
                raise AdapterFormatError(
                    f"{where}: module {name!r}: lora_A {shape_a} and lora_B {shape_b} ranks differ"
                )
            if a.get_dtype() != b.get_dtype():
                raise AdapterFormatError(f"{where}: module {name!r}: lora_A and lora_B dtypes differ")
            if a.get_dtype() not in DTYPES:
                raise AdapterFormatError(f"{where}: module {name!r}: unsupported dtype {a.get_dtype()}")
            out[name] = (shape_b[0], shape_a[1], shape_a[0], a.get_dtype())
    return out


def scaling_rule(config: Mapping[str, Any]) -> Callable[[str, int], float]:
    """The adapter's LoRA scaling per module, `(name, rank) -> scaling`: alpha/r, or alpha/√r with use_rslora,
    with `rank_pattern` and `alpha_pattern` resolved by PEFT's rule (`app.checks.peft_patterns`). A pattern
    key that is not a regular expression is refused here, before any tensor is read; so is a module whose
    rank in the weights is not the one the config gives it."""
    try:
        rank_pattern = PeftPattern.compile(config.get("rank_pattern"), "rank_pattern")
        alpha_pattern = PeftPattern.compile(config.get("alpha_pattern"), "alpha_pattern")
    except PatternError as error:
        raise AdapterFormatError(str(error)) from None

    def scaling(name: str, rank: int) -> float:
        r = int(rank_pattern.value(name, config.get("r", rank)))
        alpha = float(alpha_pattern.value(name, config.get("lora_alpha", r)))
        if r != rank:
            raise AdapterFormatError(f"module {name!r}: the config says r={r} but the weights have rank {rank}")
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    return scaling


def read_adapter_factors(config: dict, weights_path: Path, weight: float) -> dict[str, TaskFactors]:
    """Every module's factors in float32, (out, in) orientation, with weight·scaling folded into lora_B."""
    check_config(config)
    where = str(Path(weights_path).name)
    scaling = scaling_rule(config)
    factors: dict[str, TaskFactors] = {}
    with safe_open(str(weights_path), framework="pt") as handle:
        for name, sides in _pairs(list(handle.keys()), where).items():
            lora_A, lora_B = handle.get_tensor(sides["A"]), handle.get_tensor(sides["B"])
            if lora_A.dim() != 2 or lora_B.dim() != 2:
                raise AdapterFormatError(
                    f"{where}: module {name!r} has {lora_A.dim()}-D LoRA weights (conv layers are not supported)"
                )
            if lora_A.dtype not in DTYPES.values() or lora_B.dtype not in DTYPES.values():
                raise AdapterFormatError(f"{where}: module {name!r}: unsupported dtype {lora_A.dtype}")
            if lora_A.shape[0] != lora_B.shape[1]:
                raise AdapterFormatError(f"{where}: module {name!r}: lora_A and lora_B ranks differ")
            scale = weight * scaling(name, int(lora_A.shape[0]))
            factors[name] = TaskFactors(lora_A=lora_A.float(), lora_B=lora_B.float() * scale)
    return factors


def shapes_only(shapes: Sequence[Mapping[str, tuple[int, int, int, str]]]) -> dict[str, list[TaskFactors | None]]:
    """Every module's factors (`adapter_shapes` per adapter) as shape-only float32 tensors (device "meta"),
    modules in the order of first appearance."""
    names = list(dict.fromkeys(name for per_adapter in shapes for name in per_adapter))
    modules: dict[str, list[TaskFactors | None]] = {}
    for name in names:
        row: list[TaskFactors | None] = []
        for per_adapter in shapes:
            if name not in per_adapter:
                row.append(None)
                continue
            m, n, r, _ = per_adapter[name]
            lora_A, lora_B = (torch.empty(shape, device="meta") for shape in ((r, n), (m, r)))
            row.append(TaskFactors(lora_A=lora_A, lora_B=lora_B))
        modules[name] = row
    return modules


def read_order(shapes: Sequence[Mapping[str, tuple[int, int, int, str]]]) -> list[str]:
    """The order in which `merge_adapter_files` reads modules (the engine's batches): what a download that
    feeds the merge as it arrives (`workers/jobs/streamed_inputs.py`) fetches first."""
    return [name for batch in batches(shapes_only(shapes)) for name in batch]


def read_spans(paths: Sequence[Path]) -> list[list[tuple[int, int]]]:
    """Each weights file's tensor byte spans (absolute offsets) in the order `merge_adapter_files` reads them:
    module by module (`read_order`), lora_B then lora_A. Only the headers are read."""
    shapes = [adapter_shapes(path) for path in paths]
    order = read_order(shapes)
    spans = []
    for path in paths:
        with TensorFile(Path(path)) as handle:
            pairs = _pairs(handle.keys(), Path(path).name)
            spans.append([handle.span(pairs[name][side]) for name in order if name in pairs for side in "BA"])
    return spans


class _StackedReader:
    """The engine's `loader` for a file-to-file merge: reads one module's factors for all adapters, on each
    call, straight into one float32 buffer per side (B_s = [B_1 … B_T], A_s = [A_1; …; A_T]) so the engine
    stacks them without another copy; each adapter's TaskFactors are slices of those buffers, with
    weight·scaling folded into lora_B. Nothing is cached: methods load a batch of modules, merge it and let
    it go, so one batch of inputs is in memory at a time and the next batch reuses its pages (first-touch
    page faults cost as much as the reading itself). Refuses NaN/Inf factors (MergeInputError) per tensor,
    while it is in cache. Use as a context manager: the files stay open while the merge runs.
    """

    def __init__(self, inputs: Sequence[tuple[dict, Path, float]], shapes: list[dict[str, tuple[int, int, int, str]]],
                 device: torch.device | str = "cpu", arrivals: Sequence[Arrival | None] | None = None):
        self._shapes = shapes
        self._arrivals = list(arrivals) if arrivals is not None else [None] * len(inputs)
        self._device = torch.device(device)
        # every scaling before any tensor is read (a config whose r disagrees with the weights is refused here)
        self._scales: list[dict[str, float]] = []
        for (config, _, weight), per_adapter in zip(inputs, shapes, strict=True):
            scaling = scaling_rule(config)
            self._scales.append({name: float(weight) * scaling(name, r) for name, (_, _, r, _) in per_adapter.items()})
        self._paths = [Path(path) for _, path, _ in inputs]
        self._handles: list[TensorFile] = []
        self._pairs: list[dict[str, dict[str, str]]] = []
        # B_t (m×r) is a column block of B_s, so it is read into a reused buffer and scaled into place;
        # A_t (r×n) is a row block of A_s, contiguous, so a float32 A_t is read straight into it
        self._scratch = torch.empty(max((m * r for per in shapes for m, _, r, _ in per.values()), default=0),
                                    device="cpu")  # file reads land in host memory

    def __enter__(self) -> _StackedReader:
        try:
            for path, arrival in zip(self._paths, self._arrivals, strict=True):
                self._handles.append(TensorFile(path, arrival))
                self._pairs.append(_pairs(self._handles[-1].keys(), path.name))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.close()

    def shapes_only(self) -> dict[str, list[TaskFactors | None]]:
        """Every module's factors as shape-only float32 tensors (device "meta"): what the engine validates
        and plans batches with before any data is read."""
        return shapes_only(self._shapes)

    def __call__(self, name: str) -> list[TaskFactors | None]:
        present = [t for t, per_adapter in enumerate(self._shapes) if name in per_adapter]
        m, n, _, _ = self._shapes[present[0]][name]
        total = sum(self._shapes[t][name][2] for t in present)
        stack_B, stack_A = torch.empty(m, total, device="cpu"), torch.empty(total, n, device="cpu")
        row: list[TaskFactors | None] = [None] * len(self._shapes)
        start = 0
        for t in present:
            r = self._shapes[t][name][2]
            handle, sides = self._handles[t], self._pairs[t][name]
            part_B, part_A = stack_B[:, start : start + r], stack_A[start : start + r]
            fp32_B, fp32_A = (handle.dtype(sides[side]) == torch.float32 for side in "BA")
            raw_B = handle.read(sides["B"], out=self._scratch[: m * r] if fp32_B else None)
            raw_A = handle.read(sides["A"], out=part_A if fp32_A else None)
            if not (finite(raw_B) and finite(raw_A)):  # checked while the tensors are still in cache
                raise MergeInputError(f"module {name!r}, adapter {t}: factors contain NaN or Inf")
            if fp32_B:
                torch.mul(raw_B, self._scales[t][name], out=part_B)
            else:  # upcast exactly first, then scale in float32
                part_B.copy_(raw_B).mul_(self._scales[t][name])
            if not fp32_A:
                part_A.copy_(raw_A)
            start += r
        if self._device.type != "cpu":  # one copy per side to the worker's device, streamed batch by batch
            stack_B, stack_A = stack_B.to(self._device), stack_A.to(self._device)
        start = 0
        for t in present:
            r = self._shapes[t][name][2]
            row[t] = TaskFactors(lora_A=stack_A[start : start + r], lora_B=stack_B[:, start : start + r])
            start += r
        return row


def _target_modules(inputs: Sequence[tuple[dict, Path, float]], names: Sequence[str]) -> list[str]:
    """The union of the inputs' target modules as leaf names (`q_proj`) when every input wraps every layer
    of its targets; the exact module names when one was restricted (`layers_to_transform`, `layers_pattern`,
    `exclude_modules`, or targets given as a regex, "all-linear" or dotted names), so that PEFT wraps exactly
    the merged modules and creates no empty LoRA layers elsewhere."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    for config, _, _ in inputs:
        targets = config.get("target_modules")
        plain = isinstance(targets, list) and all(isinstance(t, str) and "." not in t for t in targets)
        restricted = any(config.get(key) not in (None, [], "") for key in ("layers_to_transform", "layers_pattern"))
        if not plain or restricted or config.get("exclude_modules"):
            return sorted(names)
    return leaves


def _output_config(inputs: Sequence[tuple[dict, Path, float]], ranks: dict[str, int]) -> dict[str, Any]:
    counts = Counter(ranks.values())
    r = max(counts.items(), key=lambda item: (item[1], -item[0]))[0] if counts else 1
    pattern = {name: k for name, k in ranks.items() if k != r}
    first = inputs[0][0]
    return {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": _target_modules(inputs, list(ranks)),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": any(bool(config.get("fan_in_fan_out", False)) for config, _, _ in inputs),
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
    }


def merge_adapter_files(
    inputs: Sequence[tuple[dict, Path, float]],
    method: str,
    params: dict,
    output: dict,
    out_dir: Path,
    progress: Callable[[float, str], None] | None = None,
    device: torch.device | str = "cpu",
    read_ahead: int = READ_AHEAD,
    calibration: Any = None,
    arrivals: Sequence[Arrival | None] | None = None,
) -> dict:
    """Merge PEFT adapters file to file: inputs are (adapter_config, adapter_model.safetensors, weight).
    The factors are read on the CPU and each batch is moved to `device`, where the merge computes; up to
    `read_ahead` modules are read on a second thread ahead of the merge (0: read when asked). `arrivals`
    (one per input, or None): the weights files are still arriving, and each tensor read first waits for its
    bytes (`TensorFile`'s `arrival`); the headers must be complete when this is called.

    Writes `out_dir/adapter_model.safetensors`, `adapter_config.json` and `merge_report.json`; returns
    the report. Refuses (MergeInputError / AdapterFormatError) before any compute when the parameters,
    base models, formats or shapes do not allow the merge.
    """
    entry = registry.get("merge", method)
    try:
        checked = entry.params_model.model_validate(params)
        spec = MergeOutput.model_validate(output)
    except ValidationError as exc:
        raise MergeInputError(f"invalid merge parameters or output: {exc}") from None
    if not inputs:
        raise MergeInputError("no adapters to merge")
    for config, _, _ in inputs:
        check_config(config)
    bases = {str(config.get("base_model_name_or_path")) for config, _, _ in inputs}
    if len(bases) > 1 and not getattr(checked, "allow_base_mismatch", False):
        raise MergeInputError(f"adapters are for different base models: {sorted(bases)} (allow_base_mismatch)")
    # shapes from the headers, before reading any tensor
    shapes = [adapter_shapes(path) for _, path, _ in inputs]
    seen: dict[str, tuple[int, int, int]] = {}
    for t, per_module in enumerate(shapes):
        for name, (m, n, _, _) in per_module.items():
            if name in seen and seen[name][:2] != (m, n):
                raise MergeInputError(
                    f"module {name!r}: base shapes differ (adapter {seen[name][2]}: {seen[name][0]}×{seen[name][1]}, "
                    f"adapter {t}: {m}×{n})"
                )
            seen.setdefault(name, (m, n, t))
    dtypes = {dtype for per_module in shapes for (_, _, _, dtype) in per_module.values()}
    # merge, reading each module's factors when the method asks for them; then write
    # (a second thread reads the next modules while the current batch merges: workers/formats/prefetch.py)
    with _StackedReader(inputs, shapes, device, arrivals) as reader:
        planned = reader.shapes_only()
        order = read_order(shapes)
        if read_ahead <= 0:
            result = merge_modules(method, planned, checked, spec, progress, loader=reader, calibration=calibration)
        else:
            with Prefetching(reader, order, ahead=read_ahead) as loader:
                result = merge_modules(
                    method, planned, checked, spec, progress, loader=loader, calibration=calibration
                )
    out_dtype = DTYPES[dtypes.pop()] if len(dtypes) == 1 else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    for name, merged in result.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = merged.lora_A.to("cpu", out_dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = merged.lora_B.to("cpu", out_dtype).contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tensors(out_dir / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    config = _output_config(inputs, {name: m.rank for name, m in result.modules.items()})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "merge_report.json").write_text(json.dumps(result.report))
    return result.report


def read_lora_modules(config: dict, weights_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Every module's (lora_A, lora_B) as stored (their own dtype, (out, in) orientation) and its PEFT scaling
    (`scaling_rule`), for methods that keep the adapter's factors and config (compression's cast, quantize)."""
    check_config(config)
    where = str(Path(weights_path).name)
    scaling = scaling_rule(config)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    with TensorFile(Path(weights_path)) as handle:
        for name, sides in _pairs(handle.keys(), where).items():
            lora_A, lora_B = handle.read(sides["A"]), handle.read(sides["B"])
            if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
                raise AdapterFormatError(f"{where}: module {name!r}: lora_A {list(lora_A.shape)} and lora_B "
                                         f"{list(lora_B.shape)} are not a pair of 2-D factors of one rank")
            modules[name] = (lora_A, lora_B, scaling(name, int(lora_A.shape[0])))
    return modules
