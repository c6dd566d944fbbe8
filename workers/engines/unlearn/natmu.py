"""`natmu`: natural machine unlearning (He et al., "Towards Natural Machine Unlearning", arXiv 2405.15495,
TPAMI 2025; `ZhengbaoHe/NatMU:sample-wise/natmu.py`, `utils/generate_patch_data.py`, as specified in
`research/seed-methods.md` §3). No ascent: the model is fine-tuned with CE on D_r plus hybrids.

1. Masks over an H×W image, b = S/2 and Λ(r) = r/b for r < b, else (S−1−r)/b: M1 = Λ over rows, M2 = Λ over
   columns, M3 = (b−1)/b − Λ over rows, M4 the same over columns; then M ← clip(M + δ, 0, 1).
2. Targets: for each forget row, the top `targets` classes of the original model's softmax, its true class
   masked out.
3. Rebalancing: n̄ = |D_r|/K; classes chosen fewer than 0.4·n̄ times are recorded in index order (only classes
   with retain rows: a forgotten class is never a target, decided here); a class
   chosen more than 0.98·n̄ times hands its excess (its last assignments, in forget-row order) to one recorded
   class, popped at random.
4. Hybrid x̃_k = M_k⊙x_f + (1−M_k)⊙x_r,k labelled c_k, x_r,k a retain image of class c_k drawn without
   replacement (cycling through a fresh permutation when a class has fewer images than it is asked for).

Decided here (the spec leaves these open or the service differs from the scripts):
- Mixing happens on the tensors the job supplies, not on uint8 pixels before augmentation: per-channel
  normalisation is affine and M + (1−M) = 1, so mixing normalised tensors equals normalising mixed pixels up
  to the reference's uint8 rounding. No augmentation is applied (the service trains on the rows as given).
- Target classes that have no retain row (other forgotten classes) are masked like the true class.
- Each step takes a hybrid batch and a retain batch and weights their mean CEs by their shares of the union,
  an unbiased estimate of the reference's shuffled-union batches (`losses.union_weights`).
- Inputs: `pixel_values`/`inputs` of shape (N, …, H, W), or flat (N, S²) rows read as S×S images (sklearn
  digits). Text classifiers (`input_ids`) and language models: the paper gives no recipe (splicing retain
  spans into forget texts would be new research), so they are refused with `unsupported_family`.
- The full-class script's re-initialised final layer (`-i`) is not offered.
Defaults are the CIFAR-10 sample-wise row: AdamW, lr 1e-3 (when given), weight decay 2e-3, δ = −0.19, batch 128,
cosine schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from app.schemas.unlearn import NatmuParams
from workers.engines.registry import register
from workers.engines.unlearn.data import ClassifierData, batches
from workers.engines.unlearn.errors import UnsupportedFamily
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import classifier_logits, image_input_key, union_weights

UNDER_USED, OVER_USED = 0.4, 0.98


def tent(size: int) -> Tensor:
    """Λ(r) = r/b for r < b, else (size−1−r)/b, b = size/2."""
    b = size / 2
    r = torch.arange(size, dtype=torch.float32, device="cpu")  # masks apply to the rows, which live on the host
    return torch.where(r < b, r / b, (size - 1 - r) / b)


def natmu_masks(height: int, width: int, delta: float) -> Tensor:
    """The four masks (4, H, W): Λ over rows, Λ over columns, V over rows, V over columns; shifted and clipped."""
    rows, cols = tent(height)[:, None].expand(height, width), tent(width)[None, :].expand(height, width)
    v_rows = (height / 2 - 1) / (height / 2) - rows
    v_cols = (width / 2 - 1) / (width / 2) - cols
    return (torch.stack([rows, cols, v_rows, v_cols]) + delta).clamp(0.0, 1.0)


def pick_targets(probabilities: Tensor, labels: Tensor, allowed: Tensor, count: int) -> Tensor:
    """(N, count) classes: the most probable ones other than the true class and outside `allowed` = False."""
    masked = probabilities.clone()
    masked[:, ~allowed] = -1.0
    masked.scatter_(1, labels[:, None], -1.0)
    return masked.topk(count, dim=1).indices


def rebalance(targets: Tensor, labels: Tensor, allowed: Tensor, n_retain: int, generator: torch.Generator) -> Tensor:
    """Move the excess of classes chosen > 0.98·n̄ times to classes chosen < 0.4·n̄ times (n̄ = |D_r|/K); only
    classes that have retain rows (`allowed`) are recorded as under-used."""
    targets = targets.clone()
    num_classes = allowed.numel()
    mean = n_retain / num_classes
    counts = torch.bincount(targets.reshape(-1), minlength=num_classes)
    under = [c for c in range(num_classes) if allowed[c] and counts[c] < UNDER_USED * mean]
    for c in range(num_classes):
        excess = int(counts[c]) - math.floor(OVER_USED * mean)
        if counts[c] <= OVER_USED * mean or not under:
            continue
        receiver = under.pop(int(torch.randint(len(under), (1,), generator=generator, device=generator.device)))
        rows, slots = (targets == c).nonzero(as_tuple=True)
        for row, slot in list(zip(rows.tolist(), slots.tolist(), strict=True))[::-1][:excess]:
            if receiver != int(labels[row]) and receiver not in targets[row].tolist():
                targets[row, slot] = receiver
    return targets


def hybrids(
    forget: ClassifierData,
    retain: ClassifierData,
    targets: Tensor,
    masks: Tensor,
    key: str,
    generator: torch.Generator,
) -> ClassifierData:
    """x̃ = M_k⊙x_f + (1−M_k)⊙x_r,k with label c_k = targets[i, k], for every forget row i and slot k."""
    x_f, x_r = forget.inputs[key], retain.inputs[key]
    pools = {c: (retain.labels == c).nonzero(as_tuple=True)[0] for c in targets.unique().tolist()}
    drawn: dict[int, list[int]] = {c: [] for c in pools}
    sources = torch.empty(targets.shape, dtype=torch.long, device=targets.device)
    for i in range(targets.shape[0]):
        for k in range(targets.shape[1]):
            c = int(targets[i, k])
            if not drawn[c]:
                order = torch.randperm(len(pools[c]), generator=generator, device=generator.device)
                drawn[c] = pools[c][order].tolist()
            sources[i, k] = drawn[c].pop()
    shape = x_f.shape[1:]
    side = math.isqrt(shape[0]) if len(shape) == 1 else 0
    image_f = x_f.reshape(-1, side, side) if side else x_f
    image_r = x_r.reshape(-1, side, side) if side else x_r
    mask = masks[: targets.shape[1]].to(x_f.dtype)  # (k, H, W), broadcast over leading channel dims
    mixed = []
    for k in range(targets.shape[1]):
        m = mask[k]
        mixed.append(m * image_f + (1 - m) * image_r[sources[:, k]])
    out = torch.stack(mixed, dim=1).reshape(-1, *shape)  # forget row i's hybrids are rows i·k … i·k + k−1
    return ClassifierData({key: out}, targets.reshape(-1))


def _image_size(data: ClassifierData, key: str | None) -> tuple[int, int]:
    """(H, W) of the image input `key`; refuses non-image inputs."""
    if key is None:
        raise UnsupportedFamily(
            "natmu builds image hybrids: it needs one floating-point image input (pixel_values or inputs); "
            "the paper gives no recipe for text classifiers or language models"
        )
    shape = data.inputs[key].shape[1:]
    if len(shape) >= 2:
        return int(shape[-2]), int(shape[-1])
    side = math.isqrt(int(shape[0]))
    if side * side != int(shape[0]) or side < 2:
        raise UnsupportedFamily(f"natmu: flat inputs of width {int(shape[0])} are not a square image")
    return side, side


@register("unlearn", "natmu", NatmuParams)
def natmu(ctx: UnlearnContext, params: NatmuParams) -> Objective:
    forget, retain = ctx.need_forget(), ctx.need_retain()
    if not isinstance(forget, ClassifierData) or not isinstance(retain, ClassifierData):
        raise UnsupportedFamily("natmu needs classifier rows")
    key = image_input_key(forget.collate([0]))
    height, width = _image_size(forget, key)
    # targets: the original model's most probable wrong classes that retain rows can supply
    ctx.model.eval()
    with torch.no_grad():
        probabilities = torch.cat(
            [
                classifier_logits(ctx.model, {k: v.to(ctx.device) for k, v in b.items()}).float().softmax(-1).cpu()
                for b in batches(forget, 256)
            ]
        )
    num_classes = probabilities.shape[1]
    allowed = torch.bincount(retain.labels, minlength=num_classes)[:num_classes] > 0
    count = min(params.targets, int(allowed.sum()) - int(allowed[forget.labels].any()))
    if count < 1:
        raise UnsupportedFamily("natmu needs retain rows of at least one class other than each forget row's")
    targets = pick_targets(probabilities, forget.labels, allowed, count)
    if params.rebalance:
        targets = rebalance(targets, forget.labels, allowed, len(retain), ctx.generator)
    masks = natmu_masks(height, width, params.delta)
    mixed = hybrids(forget, retain, targets, masks, str(key), ctx.generator)
    w_hybrid, w_retain = union_weights(len(mixed), len(retain))
    return Objective(
        forget_loss=lambda model, batch, step: w_hybrid * ctx.task_loss(model, batch),
        retain_loss=lambda model, batch, step: w_retain * ctx.task_loss(model, batch),
        forget_data=mixed,
        report={"hybrids": len(mixed), "hybrid_forget_share": float(masks[:count].mean())},
    )
