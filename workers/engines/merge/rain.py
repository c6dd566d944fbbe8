"""`rain` — RAIN-Merging (reasoning-aware instruction merging, arXiv 2602.22538, ICLR 2026).

Integrates an instruction-tuned LoRA update into a reasoning model without disturbing its thinking format.
This module holds the method, the strict projection and stage 2; `rain_code` the code's relaxed constraints and
their solve; `rain_model` what both read from the model (markers, hooks, attention geometry).
Spec: `research/seed-methods.md` §1, read from the released code (K1nght/RAIN-Merging @05003cc:
`nullspace_projection_compute.py`, `qp_true_forward_fast.py`, `unified_model_merge.py`; stage 2 re-read here at
@1ac24aa). Of the paper only the abstract could be read (arxiv.org/html/2602.22538v1): "project the ITM task
vector onto the null space of forward features at thinking special tokens" is the strict mode below; every
other detail rests on the code.

Per module the update is ΔW = B·A (the adapters' factors stacked, weight·scaling folded into B, so several
adapters are summed exactly, as `cat` / task arithmetic; output rank Σr, `output.rank` is not applied).

# stage 1: null-space projection on the reasoning rows (one hooked forward pass per row)
- `preserve: "features"` (default) — the strict feature null space: X holds the module's inputs at the
  marker tokens (± `radius`, default 0) of every reasoning row; A' = A·(I − P) with P the orthogonal projector
  onto span(X) (its numerical rank at `RANK_TOL`: the spec's P = X(XᵀX + λI)⁻¹Xᵀ in the limit λ → 0).
  Then ΔW'x = 0 for every such x: each module computes exactly what the base computes there, and the rank stays
  ≤ r. This is the default because it is the guarantee the paper states ("the computation at the thinking
  markers is unchanged"), it holds for any linear module, not only Llama-style attention, and it is exact;
  the code's relaxation keeps only a few scalars per position (below).
- `preserve: "code"` — the released code's relaxed constraints within `radius` (default 5) of the markers,
  each a scalar cᵢᵀ ΔW xᵢ = 0: attention logits of query/key pairs (q_proj: x the query's input, c the rotated
  key; k_proj: x the key's input, c the rotated query), `readouts` random unit readouts of the attention output
  (v_proj: x the attention-weighted input of head h, c = W_O,hᵀ·c; o_proj: x head h's slice of u_t) and of every
  other module (x its input, c random). They are pulled back into A-space (c̃ᵢ = Bᵀcᵢ) and solved with the
  ridge-regularised minimum-norm correction A' = A − Σ zᵢ c̃ᵢ xᵢᵀ, (G + λI)z = [c̃ᵢᵀAxᵢ], G = (C̃C̃ᵀ)∘(XXᵀ);
  λ = `ridge`·mean(diag G) (the code's absolute 1e-4 was set for full-weight directions; B rescales the
  A-space Gram, so the ridge is relative here). Direct Cholesky up to `DIRECT_MAX` constraints, CG beyond.
  Defects of the released code NOT copied ([unclear] 1, 2): (1) grouped-query attention (the code adds head
  h's projected K/V slice at kv head h % H_kv, once per query head) — every constraint of a module
  (all query heads of a K/V group) is solved jointly on that module, so a shared K/V slice is projected once,
  not once per query head; (2) causal masking — query/key pairs are (i ≥ t_s, key t_s) and (query t_e,
  j ≤ t_e), key never after query, so no logit read is a masked one; logits include the rotary rotation
  (c = R_iᵀR_j k_j), which the spec's table leaves out; (3) one forward pass per row, not one per layer.
  The per-constraint scales σ of the code are dropped: within one module they are equal, and the ridge is
  relative, so they do not change the solution.

# stage 2: instruction-attention coefficients (only with instruction rows and `coefficients`)
For each instruction row s (prompt = the instruction I, completion = the response R; U = every other token,
i.e. BOS and special tokens), layer l and head h: a = Σ_{i∈R} Σ_{j∈I} A_h[i, j] and u = Σ_{i∈R} Σ_{j∈U}
A_h[i, j], response tokens as the query rows. [unclear 3] the code (qp_true_forward_fast.py @1ac24aa,
`compute_align_leak_vectors_instruction_wise`) takes the instruction tokens as query rows: its a reads
them against the instruction and response spans, its u against "unrelated response spans" — response columns,
which causal masking zeroes (u ≈ 0, a ≈ the instruction's self-attention). Response → instruction is what can
be read, and it is what we read; uploaded rows carry no span annotations, hence U = the prompt's special tokens.
Sums over the query rows divided by the span count (1 per row) keep the code's scale, for which its defaults
(ρ, λ_H, μ, λ₂, α₀, box) were chosen. [unclear 6] with those defaults α is about the mean per-row Δa and may be
well below 1; the report holds the whole α table so a user sees it, and `coefficients: false` skips the stage.
Pass 1 on the base, pass 2 with the projected update added (α = 1); then
b = Σ_s(Δa − ρΔu), H = S·λ_H + μ·Σ_s u₁, α* = clip((b + λ₂α₀)/(H + λ₂), alpha_min, alpha_max).
Applied on the output side only: q_proj (head h's rows, α_{l,h}), k_proj/v_proj (K/V group g's rows: the
mean α of its query heads — one value per shared slice, the GQA fix again), and the layer's mean α for o_proj
and every other module in a layer (its block: the first number in its name, `layers.3.` or GPT-2's `h.3.`);
modules outside the blocks keep 1. The code scales o_proj's head-h columns
by α_{l,h}; on the input side that would undo the projection (A'·diag(α)·x ≠ 0 though A'x = 0), so o_proj
takes the layer's mean. Scaling rows of B keeps ΔW'x = 0 at the markers and the rank ≤ Σr. λ (`lambda`)
multiplies the whole update (the code's optional SCALING_FACTOR γ).

[unclear 5] attention probabilities come from the eager implementation (switched on for the passes and back);
a model that returns none is refused rather than read as zeros.

# other decisions ([unclear] 4, 7 and the data)
Rows are tokenized once by the job (prompt with special tokens, completion without, as every LM job here),
and marker positions are looked up in those very ids, so there is no BOS off-by-one between spans and the
forward pass. Reasoning rows with other than one start and one end marker (start first) are dropped, as the code
does; no chat template is applied (rows are used as uploaded). File names of the code's stage 2 do not apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from app.schemas.merge import RainParams
from workers.engines.merge.core_space import stack_factors
from workers.engines.merge.errors import MergeInputError
from workers.engines.merge.rain_code import code_constraints, project_constraints
from workers.engines.merge.rain_model import (
    AttentionBlock,
    attention_of,
    device_of,
    eager_attention,
    hooks,
    marker_positions,
    neighbourhoods,
)
from workers.engines.merge.tune import lora_applied
from workers.engines.merge.types import RANK_TOL, MergedModule, MergeJob
from workers.engines.registry import register

_LAYER = re.compile(r"(?:^|\.)(\d+)\.")  # a module's block: the first number in its name (layers.3., h.3.)


@dataclass(frozen=True)
class InstructionRow:
    """One instruction calibration row as token ids and two masks over them."""

    input_ids: Tensor  # (T,) long
    instruction: Tensor  # (T,) bool: the instruction's tokens (the prompt without special tokens)
    response: Tensor  # (T,) bool: the response's tokens (the completion)


@dataclass
class RainCalibration:
    """RAIN's inputs besides the factors: the base (reasoning) model, float32 and in eval mode; the reasoning
    rows' token ids (each with one start and one end marker); the marker token ids; the instruction rows."""

    model: nn.Module
    reasoning: list[Tensor]
    markers: tuple[int, int]
    instruction: list[InstructionRow] = field(default_factory=list)



# ---------------------------------------------------------------- stage 1, strict: the feature null space


@torch.no_grad()
def marker_inputs(model: nn.Module, names: Sequence[str], rows: Sequence[Tensor], markers: tuple[int, int],
                  radius: int) -> dict[str, Tensor]:
    """Each module's inputs (N×n, float32) at the marker positions (± radius) of every reasoning row."""
    captured: dict[str, list[Tensor]] = {name: [] for name in names}
    where: list[list[int]] = [[]]

    def grab(name: str) -> Callable[..., None]:
        def pre(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured[name].append(args[0][0, where[0]].detach().float())

        return pre

    device = device_of(model)
    with hooks(model, {name: grab(name) for name in names}, {}):
        for ids in rows:
            found = marker_positions(ids, markers)
            if found is None:
                raise MergeInputError("a reasoning row lacks exactly one start and one end marker")
            near_s, near_e = neighbourhoods(*found, radius, int(ids.numel()))
            where[0] = sorted(set(near_s) | set(near_e))
            model(ids.unsqueeze(0).to(device))
    return {name: torch.cat(parts) for name, parts in captured.items()}


def span_basis(features: Tensor) -> Tensor:
    """An orthonormal basis (n×k, float64) of the span of the rows of `features` (N×n): its numerical rank."""
    _, s, vh = torch.linalg.svd(features.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return vh[:0].mT
    return vh[s > s[0] * RANK_TOL].mT


def project_features(lora_A: Tensor, basis: Tensor) -> Tensor:
    """A' = A·(I − P), P = V·Vᵀ the projector onto the features' span: ΔW'x = B·A'·x = 0 for x in it."""
    a = lora_A.double()
    return (a - (a @ basis) @ basis.mT).to(lora_A.dtype)



# ---------------------------------------------------------------- stage 2: instruction-attention coefficients


@torch.no_grad()
def attention_shares(model: nn.Module, rows: Sequence[InstructionRow]) -> tuple[Tensor, Tensor]:
    """(a, u), each (S, L, H): the attention the response rows pay to the instruction (a) and to the
    unrelated tokens (u), summed over the response rows."""
    device = device_of(model)
    shares_a, shares_u = [], []
    with eager_attention(model):
        for row in rows:
            out = model(row.input_ids.unsqueeze(0).to(device), output_attentions=True)
            if not out.attentions or out.attentions[0] is None:
                raise MergeInputError("the model returns no attention probabilities; stage 2 needs them")
            probs = torch.stack([layer[0] for layer in out.attentions]).float()  # (L, H, T, T)
            response, instruction = row.response.to(probs.device), row.instruction.to(probs.device)
            unrelated = ~(instruction | response)
            rows_r = probs[:, :, response]  # (L, H, R, T)
            shares_a.append(rows_r[..., instruction].sum((-1, -2)))
            shares_u.append(rows_r[..., unrelated].sum((-1, -2)))
    return torch.stack(shares_a).cpu(), torch.stack(shares_u).cpu()


def coefficients(before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor], params: RainParams) -> Tensor:
    """α (L×H): the diagonal box-QP's closed form, clip((b + λ₂α₀)/(H + λ₂), lo, hi) with
    b = Σ_s(Δa − ρΔu) and H = S·λ_H + μ·Σ_s u₁."""
    (a0, u0), (a1, u1) = before, after
    rows = a0.shape[0]
    b = ((a1 - a0) - params.rho * (u1 - u0)).double().sum(0)
    curvature = rows * params.lambda_h + params.mu * u1.double().sum(0)
    alpha = (b + params.lambda_2 * params.alpha_0) / (curvature + params.lambda_2).clamp(min=1e-12)
    return alpha.clamp(params.alpha_min, params.alpha_max).float()


def scale_module(name: str, lora_A: Tensor, lora_B: Tensor, alpha: Tensor, block: AttentionBlock | None
                 ) -> tuple[Tensor, Tensor]:
    """Apply α to one module's output rows: head rows of q (α_h), K/V group rows of k and v (the group's mean α),
    the layer's mean α elsewhere in a layer (o_proj included); outside the layers, unchanged."""
    layer = _LAYER.search(name)
    if layer is None or int(layer.group(1)) >= alpha.shape[0]:
        return lora_A, lora_B
    per_head = alpha[int(layer.group(1))].to(lora_A.device, lora_A.dtype)
    kind = name.rpartition(".")[2]
    if block is None:
        return lora_A, lora_B * per_head.mean()
    d = block.head_dim
    if kind == "q_proj":
        return lora_A, lora_B * per_head.repeat_interleave(d).unsqueeze(1)
    if kind in ("k_proj", "v_proj"):
        per_group = per_head.view(block.kv_heads, -1).mean(1)
        return lora_A, lora_B * per_group.repeat_interleave(d).unsqueeze(1)
    return lora_A, lora_B * per_head.mean()  # o_proj: per-head columns of A' would undo A'x = 0 (see above)


# ---------------------------------------------------------------- the method


def _check_modules(model: nn.Module, shapes: dict[str, tuple[int, int]]) -> None:
    for name, (m, n) in shapes.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise MergeInputError(f"module {name!r} is not in the calibration model") from None
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or tuple(weight.shape) not in ((m, n), (n, m)):
            raise MergeInputError(f"module {name!r}: the model's layer does not take a {m}×{n} update")


@register("merge", "rain", RainParams)
def rain(job: MergeJob, params: RainParams) -> dict[str, MergedModule]:
    """Project each module's update off the reasoning features at the markers, scale it by instruction
    attention, and return the result as LoRA factors of rank Σr (see the module docstring)."""
    calibration = job.calibration
    if not isinstance(calibration, RainCalibration):
        raise MergeInputError("rain needs its calibration inputs (base model, reasoning rows, markers)")
    if not calibration.reasoning:
        raise MergeInputError("rain: no reasoning row has one start and one end marker")
    model = calibration.model
    names = list(job.modules)
    stacks = {name: stack_factors(name, job.factors(name)) for name in names}
    shapes = {name: (int(s.lora_B.shape[0]), int(s.lora_A.shape[1])) for name, s in stacks.items()}
    _check_modules(model, shapes)
    rows = calibration.reasoning[: params.max_rows]
    job.progress(0.05, f"rain: reading {len(rows)} reasoning rows ({params.preserve})")
    projected: dict[str, Tensor] = {}
    residuals: dict[str, dict[str, float]] = {}
    if params.preserve == "features":
        features = marker_inputs(model, names, rows, calibration.markers, params.neighbourhood())
        for name, stack in stacks.items():
            x = features[name].to(stack.lora_A.device)
            if x.shape[1] != shapes[name][1]:
                raise MergeInputError(f"module {name!r}: the model feeds it {x.shape[1]} inputs, not {shapes[name][1]}")
            basis = span_basis(x).to(stack.lora_A.device)
            projected[name] = project_features(stack.lora_A, basis)
            # the residual ‖ΔW'X‖/‖ΔWX‖ on the calibration features (m×N, never m×n)
            before = float((stack.lora_B @ (stack.lora_A @ x.mT)).norm())
            after = float((stack.lora_B @ (projected[name] @ x.mT)).norm())
            residuals[name] = {"constraints": int(x.shape[0]), "rank_removed": int(basis.shape[1]),
                               "residual": after / before if before > 0 else 0.0}
    else:
        constraints = code_constraints(model, names, shapes, rows, calibration.markers, params)
        for name, stack in stacks.items():
            c, x = constraints[name]
            projected[name] = project_constraints(stack.lora_A, stack.lora_B, c, x, params.ridge)
            pulled = c.to(stack.lora_B.device) @ stack.lora_B
            xd = x.to(stack.lora_A.device)
            before = float(((pulled @ stack.lora_A) * xd).sum(1).norm())
            after = float(((pulled @ projected[name]) * xd).sum(1).norm())
            residuals[name] = {"constraints": int(c.shape[0]), "residual": after / before if before > 0 else 0.0}
    job.progress(0.6, "rain: projected; instruction coefficients")
    blocks = {name: attention_of(model, name) for name in names}
    alpha: Tensor | None = None
    instruction = calibration.instruction[: params.max_rows]
    if params.coefficients and instruction:
        before_shares = attention_shares(model, instruction)
        factors = {name: (projected[name], stacks[name].lora_B) for name in names}
        with lora_applied(model, factors):
            after_shares = attention_shares(model, instruction)
        alpha = coefficients(before_shares, after_shares, params)
    out: dict[str, MergedModule] = {}
    for name, stack in stacks.items():
        lora_A, lora_B = projected[name], stack.lora_B
        if alpha is not None:
            lora_A, lora_B = scale_module(name, lora_A, lora_B, alpha, blocks[name])
        out[name] = MergedModule(lora_A=lora_A, lora_B=lora_B * params.lambda_ if params.lambda_ != 1.0 else lora_B)
    job.notes.update({
        "preserve": params.preserve,
        "radius": params.neighbourhood(),
        "reasoning_rows": len(rows),
        "instruction_rows": len(instruction) if alpha is not None else 0,
        "alpha": alpha.tolist() if alpha is not None else None,
        "projection": residuals,
    })
    job.progress(0.95, "rain: done")
    return out
