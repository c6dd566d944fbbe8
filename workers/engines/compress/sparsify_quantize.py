"""`sparsify_quantize`: ComPEFT-style sparsification and quantization of each factor.

Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and
Quantization" (2023): keep the top-k entries of an update by magnitude and store the survivors' signs with
one scale. Here it is applied to each LoRA factor (lora_A, lora_B) separately:

- sparsify: keep the `density` fraction of the tensor's entries with the largest magnitude (zeros never);
- quantize the survivors: `ternary` — sign × one scale per tensor, the scale being the survivors' mean
  magnitude (the least-squares scale for fixed signs; ComPEFT tunes α·std on validation data, which a
  data-free service cannot); `int8` — round(x / s_row) in −127..127 with one scale per row, s_row = the
  row's largest surviving magnitude / 127.

The quantized tensors (`Quantized`: mask, int8 codes, float32 scales) are what the compact file stores;
`dequantize` is the one way back to float32, used for the PEFT file and by the compact reader alike. The
adapter's ranks and scaling are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from app.schemas.compress import SparsifyQuantizeParams
from workers.engines.compress.report import difference_norms, module_row, totals
from workers.engines.compress.types import CompressedModule, CompressJob, CompressResult
from workers.engines.registry import register


@dataclass(frozen=True)
class Quantized:
    """A sparsified, quantized 2-D tensor: `mask` (bool, the tensor's shape) marks the kept entries, `codes`
    (int8) their quantized values in row-major order (ternary: ±1), `scale` (float32) one per tensor (ternary)
    or one per row (int8)."""

    mask: Tensor
    codes: Tensor
    scale: Tensor
    bits: str

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    def to(self, device: torch.device | str) -> Quantized:
        """The same tensors on `device` (the compact file is written from the CPU)."""
        return Quantized(mask=self.mask.to(device), codes=self.codes.to(device), scale=self.scale.to(device),
                         bits=self.bits)


def sparsify(x: Tensor, density: float) -> Tensor:
    """The mask of the ⌈density·numel⌉ entries of largest magnitude (ties broken by position); zeros never."""
    keep = min(x.numel(), math.ceil(density * x.numel()))
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    if keep:
        mask[torch.topk(x.reshape(-1).abs(), keep, sorted=False).indices] = True
    return mask.reshape(x.shape) & (x != 0)


def quantize(x: Tensor, mask: Tensor, bits: str) -> Quantized:
    """Quantize the entries of `x` (float32) under `mask`: ternary or per-row int8 (module docstring)."""
    kept = x[mask]
    if bits == "ternary":
        scale = kept.abs().mean().reshape(1) if kept.numel() else torch.zeros(1, device=x.device)
        return Quantized(mask=mask, codes=torch.sign(kept).to(torch.int8), scale=scale.float(), bits=bits)
    row_max = torch.where(mask, x.abs(), 0.0).amax(dim=1)
    scale = row_max / 127.0
    per_entry = scale[:, None].expand_as(x)[mask]
    codes = torch.round(kept / torch.where(per_entry > 0, per_entry, 1.0)).clamp(-127, 127)
    return Quantized(mask=mask, codes=codes.to(torch.int8), scale=scale.float(), bits=bits)


def dequantize(q: Quantized) -> Tensor:
    """The float32 tensor a `Quantized` stands for: codes × scale at the kept entries, zero elsewhere."""
    dense = torch.zeros(q.shape, dtype=torch.int8, device=q.mask.device)
    dense[q.mask] = q.codes
    scale = q.scale.reshape(1, 1) if q.bits == "ternary" else q.scale.reshape(-1, 1)
    return dense.float() * scale


@register("compress", "sparsify_quantize", SparsifyQuantizeParams)
def sparsify_quantize(job: CompressJob, params: SparsifyQuantizeParams) -> CompressResult:
    """Each factor sparsified to `density` and quantized to `bits`; the stored form is the `Quantized` pair."""
    out: dict[str, CompressedModule] = {}
    rows = {}
    for name, module in job.modules.items():
        stored = {}
        for side, factor in (("lora_A", module.lora_A), ("lora_B", module.lora_B)):
            x = factor.float()
            stored[side] = quantize(x, sparsify(x, params.density), params.bits)
        lora_A, lora_B = dequantize(stored["lora_A"]), dequantize(stored["lora_B"])
        norm2, diff2 = difference_norms(*module.delta_factors(), lora_B * module.scaling, lora_A)
        m, n = module.shape
        params_in = module.rank * (m + n)
        rows[name] = module_row(
            shape=module.shape,
            rank_in=module.rank,
            rank_out=module.rank,
            params_in=params_in,
            params_out=sum(int(q.codes.numel()) for q in stored.values()),
            bytes_in=params_in * module.lora_A.element_size(),
            bytes_out=sum(compact_bytes(q) for q in stored.values()),
            norm2=norm2,
            diff2=diff2,
        )
        out[name] = CompressedModule(
            lora_A=lora_A, lora_B=lora_B, scaling=module.scaling, report=rows[name], stored=stored
        )
        job.progress(len(out) / max(1, len(job.modules)), "sparsify and quantize")
    summary = totals(rows.values())
    return CompressResult(
        modules=out,
        report={"summary": summary, "density": params.density, "bits": params.bits, "modules": rows},
        config="keep",
    )


def compact_bytes(q: Quantized) -> int:
    """Bytes the compact file spends on `q`: the packed mask (1 bit per entry), the codes (int8, or 1 bit per
    kept entry's sign for ternary) and the float32 scales."""
    entries = q.mask.numel()
    codes = math.ceil(q.codes.numel() / 8) if q.bits == "ternary" else q.codes.numel()
    return math.ceil(entries / 8) + codes + 4 * q.scale.numel()
