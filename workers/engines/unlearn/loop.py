"""The shared unlearning loop: every method supplies an `Objective`; this module steps it (`driver.py` decides
how many steps, at which learning rate).

A method is `fn(ctx: UnlearnContext, params) -> Objective`. The objective names a forget loss and/or a
retain loss (each `loss(model, batch, step) -> scalar`) and how they combine:

- joint (default): one optimiser step per iteration on γ·L_f + α·L_r (the weights live inside the losses);
- alternating (`forget_every=k`): a forget step every k iterations, then a retain step every iteration,
  each with its own gradient mask and clipping (SFR-on's fast–slow loop; `clip_retain=False` leaves the
  retain step unclipped as its reference does); an objective with a `learn_loss` (`ug_clu`) adds to each forget
  step the gradient of that loss on a batch of `ctx.learn` rows, under the same mask, each of the two
  gradients clipped to `forget_clip` on its own before they are summed;
- passes (`passes=True`): one pass of forget batches, then one pass of retain batches, one step per batch
  (SalUn's and random labelling's epochs in `Unlearn-Saliency:Classification/unlearn/RL.py`).

Masks multiply gradients; `restore_outside_mask` resets masked-out weights to θ0 after each step (SalUn).
With `gu`, the (masked) forget gradient is projected off the span of the per-sample gradients of the step's
retain batch: mask first, project last, so the update applied is orthogonal to the retain gradients.
An objective with `edit` takes no optimiser step: `edit(judge)` changes the weights and returns its report (SSD);
`judge(full)` measures the goal on the current weights when the run is goal-driven, else it is None.
Seeds, gradient clipping and the LR schedule live here; `snapshot`/`restore` copy the trained state.
Mixed precision: with `ctx.autocast` set (the job's `AMEND_PRECISION`, e.g. bfloat16), every loss of a step is
computed under `torch.autocast(device type, dtype)` (`ctx.forward()`); gradients are taken outside it, and the
weights, optimiser state and masks stay float32. None (the default) runs exactly the float32 path.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from workers.engines.unlearn import gu as gu_projection
from workers.engines.unlearn.data import BatchStream, Data, to_device
from workers.engines.unlearn.errors import MissingInput, NonFinite
from workers.engines.unlearn.losses import (
    classifier_logits,
    compute_batch_nll,
    mean_token_nll,
    per_sample_ce,
)

log = logging.getLogger(__name__)

Loss = Callable[[nn.Module, dict[str, Tensor], int], Tensor]


@dataclass
class UnlearnContext:
    """What a method may read while it builds its objective (before any weight changes)."""

    model: nn.Module
    family: str
    forget: Data | None
    retain: Data | None
    tokenizer: Any
    generator: torch.Generator
    device: torch.device
    trainable: list[tuple[str, nn.Parameter]]
    is_peft: bool
    horizon: int = 1  # the iterations schedules run over: `steps`, or a goal-driven run's step budget
    autocast: torch.dtype | None = None  # the forward passes' autocast dtype; None: float32, no autocast
    learn: Data | None = None  # rows to learn in the same run (continual learn-and-unlearn: `ug_clu`)
    _reference: nn.Module | None = None

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Where a step's losses are computed: under `torch.autocast` when `autocast` is set, else as is."""
        if self.autocast is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.autocast):
            yield

    def reference(self) -> nn.Module:
        """A frozen copy of the input model θ0 (made on first use, which is before training starts)."""
        if self._reference is None:
            self._reference = copy.deepcopy(self.model).eval()
            for parameter in self._reference.parameters():
                parameter.requires_grad_(False)
        return self._reference

    def need_forget(self) -> Data:
        if self.forget is None:
            raise MissingInput("this method needs forget rows")
        return self.forget

    def need_retain(self) -> Data:
        if self.retain is None:
            raise MissingInput("this method needs retain rows")
        return self.retain

    def need_learn(self) -> Data:
        if self.learn is None:
            raise MissingInput("this method needs learn rows")
        return self.learn

    def task_loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The training loss of the family: mean CE (classifier) or mean answer-token NLL (causal LM)."""
        if self.family == "classifier":
            return per_sample_ce(classifier_logits(model, batch), batch["labels"]).mean()
        return mean_token_nll(*compute_batch_nll(model, batch))


@dataclass
class Objective:
    forget_loss: Loss | None = None
    retain_loss: Loss | None = None
    forget_every: int = 0  # 0: joint steps; k ≥ 1: alternating, a forget step every k iterations
    passes: bool = False  # a pass of forget batches, then a pass of retain batches, each its own step
    forget_mask: dict[str, Tensor] | None = None
    retain_mask: dict[str, Tensor] | None = None
    restore_outside_mask: bool = False
    forget_clip: float | None = None
    clip_retain: bool = True  # False: the retain step is not clipped (SFR-on clips only its forget step)
    trainable: list[tuple[str, nn.Parameter]] | None = None  # a subset of ctx.trainable (RMU)
    forget_data: Any = None  # replaces ctx.forget for the forget batches (paired template rows)
    learn_loss: Loss | None = None  # alternating only: descended on a learn batch in each forget step
    retain_data: Any = None  # replaces ctx.retain for the retain batches (ug_clu: retain ∪ learn rows)
    # a one-shot edit (SSD): given a judge of the goal (full splits or not) when the run is goal-driven
    edit: Callable[[Callable[[bool], Any] | None], dict[str, Any]] | None = None
    report: dict[str, Any] = field(default_factory=dict)


def _grads(loss: Tensor, parameters: list[nn.Parameter]) -> list[Tensor]:
    if not torch.isfinite(loss):
        raise NonFinite(f"loss is {float(loss)}")
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]


def _flat(grads: list[Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1).float() for g in grads])


def _unflat(vector: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for g in like:
        out.append(vector[start : start + g.numel()].view_as(g).to(g.dtype))
        start += g.numel()
    return out


def _make_optimizer(params: Any, parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    decay = float(params.weight_decay)
    if params.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=decay)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay)


def _schedule(
    optimizer: torch.optim.Optimizer, params: Any, horizon: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if params.lr_schedule == "cosine" and horizon > 0:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, horizon) / horizon))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)


def _rows(batch: dict[str, Tensor], count: int) -> list[dict[str, Tensor]]:
    """The first `count` rows of a batch, each as a batch of one."""
    size = next(iter(batch.values())).shape[0]
    return [{key: value[i : i + 1] for key, value in batch.items()} for i in range(min(count, size))]


def _masked(names: list[str], grads: list[Tensor], mask: dict[str, Tensor] | None) -> list[Tensor]:
    if mask is None:
        return grads
    return [g * mask[name] if name in mask else g for name, g in zip(names, grads, strict=True)]


def _clipped(grads: list[Tensor], max_norm: float) -> list[Tensor]:
    """The gradients scaled as `clip_grad_norm_` scales them: by min(1, max_norm / (‖g‖ + 1e-6))."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * scale.to(g.dtype) for g in grads]


class _Trainer:
    """One optimiser over the objective's parameters at a fixed base learning rate; `step(t)` is iteration t."""

    def __init__(
        self,
        ctx: UnlearnContext,
        objective: Objective,
        params: Any,
        lr: float,
        horizon: int,
        anchor: list[Tensor] | None = None,
    ) -> None:
        self.ctx, self.objective, self.params = ctx, objective, params
        named = objective.trainable if objective.trainable is not None else ctx.trainable
        if not named:
            raise MissingInput("no trainable parameter")
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        self.lr = lr
        self.optimizer = _make_optimizer(params, self.parameters, lr)
        self.scheduler = _schedule(self.optimizer, params, horizon)
        self.use_gu = bool(getattr(params, "gu", False)) and objective.forget_loss is not None
        if self.use_gu and ctx.retain is None:
            raise MissingInput("gu needs retain rows")
        generator = ctx.generator
        size = int(params.batch_size)
        forget = objective.forget_data if objective.forget_data is not None else ctx.forget
        self.forget = BatchStream(forget, size, generator) if objective.forget_loss and forget else None
        retain = objective.retain_data if objective.retain_data is not None else ctx.retain
        self.retain = BatchStream(retain, size, generator) if retain is not None else None
        self.learn = BatchStream(ctx.learn, size, generator) if objective.learn_loss and ctx.learn else None
        self.anchor = anchor
        if objective.restore_outside_mask and objective.forget_mask is not None and anchor is None:
            self.anchor = [p.detach().clone() for p in self.parameters]
        self.epoch = self._epoch_length() if objective.passes else 0
        self.count = 0
        self.kept: list[float] = []
        self.last: dict[str, float] = {}

    def _epoch_length(self) -> tuple[int, int]:
        size = int(self.params.batch_size)
        n_forget = -(-len(self.forget.data) // size) if self.forget is not None else 0
        n_retain = -(-len(self.retain.data) // size) if self.retain is not None and self.objective.retain_loss else 0
        return n_forget, n_retain  # type: ignore[return-value]

    def _batch(self, stream: BatchStream | None) -> dict[str, Tensor]:
        if stream is None:
            raise MissingInput("this method needs rows it was not given")
        return to_device(stream.next(), self.ctx.device)

    def _retain_basis(self, retain_batch: dict[str, Tensor], mask: dict[str, Tensor] | None) -> Tensor:
        """Orthonormal rows spanning the per-sample task-loss gradients of the step's retain batch (GU).

        As `geo-unlearning`'s `orthograd.py`: the retain batch itself, in train mode, one backward per row
        (the first `gu_retain_samples` rows). The task loss (CE / answer NLL), not the method's retain term,
        which may vanish at θ0 (RMU's activation MSE) or be weighted by α = 0. The gradients are masked like
        the forget gradient, so the projected update stays inside the mask and is orthogonal to the full
        retain gradients.
        """
        vectors = []
        for row in _rows(retain_batch, int(self.params.gu_retain_samples)):
            with self.ctx.forward():
                loss = self.ctx.task_loss(self.ctx.model, row)
            grads = _grads(loss, self.parameters)
            vectors.append(_flat(_masked(self.names, grads, mask)))
        return gu_projection.orthonormal_basis(vectors)

    def _term_grads(
        self, name: str, loss_fn: Loss | None, batch: dict[str, Tensor], step: int, mask: dict[str, Tensor] | None
    ) -> list[Tensor]:
        """The gradient of one term of the objective on `batch`, masked; its value is kept as `<name>_loss`."""
        if loss_fn is None:
            raise RuntimeError(f"no {name} loss")
        with self.ctx.forward():
            loss = loss_fn(self.ctx.model, batch, step)
        self.last[f"{name}_loss"] = float(loss.detach())
        return _masked(self.names, _grads(loss, self.parameters), mask)

    def _forget_grads(self, step: int, mask: dict[str, Tensor] | None, retain_batch: Callable[[], Any]) -> list[Tensor]:
        """The forget gradient, masked, then (with GU) projected off the retain basis: mask first, project last."""
        grads = self._term_grads("forget", self.objective.forget_loss, self._batch(self.forget), step, mask)
        if self.use_gu:
            flat = _flat(grads)
            projected = gu_projection.project_off(flat, self._retain_basis(retain_batch(), mask))
            self.kept.append(gu_projection.kept_fraction(flat, projected))
            grads = _unflat(projected, grads)
        return grads

    def _learn_grads(self, step: int, mask: dict[str, Tensor] | None) -> list[Tensor]:
        return self._term_grads("learn", self.objective.learn_loss, self._batch(self.learn), step, mask)

    def _retain_grads(self, step: int, batch: dict[str, Tensor]) -> list[Tensor]:
        return self._term_grads("retain", self.objective.retain_loss, batch, step, self.objective.retain_mask)

    def _apply(self, grads: list[Tensor], clip: float | None) -> None:
        for p, g in zip(self.parameters, grads, strict=True):
            p.grad = g
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.anchor is not None and self.objective.forget_mask is not None:
            with torch.no_grad():
                for name, p, p0 in zip(self.names, self.parameters, self.anchor, strict=True):
                    if name in self.objective.forget_mask:
                        p.copy_(torch.where(self.objective.forget_mask[name].bool(), p, p0))

    def step(self, step: int) -> None:
        """Iteration `step` (the global iteration: losses with schedules read it)."""
        objective, clip = self.objective, float(self.params.max_grad_norm)
        retain_clip = clip if objective.clip_retain else None
        drawn: list[dict[str, Tensor]] = []

        def retain_batch() -> dict[str, Tensor]:  # one retain batch per iteration, shared by GU and the step
            if not drawn:
                drawn.append(self._batch(self.retain))
            return drawn[0]

        if objective.passes:
            n_forget, n_retain = self.epoch  # type: ignore[misc]
            if objective.forget_loss is not None and self.count % (n_forget + n_retain) < n_forget:
                self._apply(self._forget_grads(step, objective.forget_mask, retain_batch), clip)
            else:
                self._apply(self._retain_grads(step, retain_batch()), retain_clip)
        elif objective.forget_every == 0:
            grads: list[Tensor] | None = None
            if objective.forget_loss is not None:
                grads = self._forget_grads(step, objective.forget_mask, retain_batch)
            if objective.retain_loss is not None:
                retain = self._retain_grads(step, retain_batch())
                grads = retain if grads is None else [a + b for a, b in zip(grads, retain, strict=True)]
            if grads is not None:
                self._apply(grads, clip)
        else:
            if objective.forget_loss is not None and step % objective.forget_every == 0:
                grads = self._forget_grads(step, objective.forget_mask, retain_batch)
                if objective.learn_loss is not None:  # each of the two clipped on its own, then summed
                    limit = objective.forget_clip or clip
                    learned = _clipped(self._learn_grads(step, objective.forget_mask), limit)
                    grads = [a + b for a, b in zip(_clipped(grads, limit), learned, strict=True)]
                    self._apply(grads, None)
                else:
                    self._apply(grads, objective.forget_clip or clip)
            if objective.retain_loss is not None:
                self._apply(self._retain_grads(step, retain_batch()), retain_clip)
        self.count += 1
        self.scheduler.step()


def snapshot(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    """A copy of the trainable parameters and every buffer (batch-norm statistics change in train mode)."""
    state = {f"p:{name}": p.detach().clone() for name, p in named}
    state.update({f"b:{name}": b.detach().clone() for name, b in model.named_buffers()})
    return state


def restore(model: nn.Module, named: list[tuple[str, nn.Parameter]], state: dict[str, Tensor]) -> None:
    """Put a `snapshot` back, in place (the parameter objects stay the ones optimisers hold)."""
    with torch.no_grad():
        for name, p in named:
            p.copy_(state[f"p:{name}"])
        for name, b in model.named_buffers():
            if f"b:{name}" in state:
                b.copy_(state[f"b:{name}"])
