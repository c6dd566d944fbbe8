"""The shared unlearning loop: every method supplies an `Objective`; this module trains it.

A method is `fn(ctx: UnlearnContext, params) -> Objective`. The objective names a forget loss and/or a
retain loss (each `loss(model, batch, step) -> scalar`) and how they combine:

- joint (default): one optimiser step per iteration on γ·L_f + α·L_r (the weights live inside the losses);
- alternating (`forget_every=k`): a forget step every k iterations, then a retain step every iteration,
  each with its own gradient mask and clipping (SalUn's passes, SFR-on's fast–slow loop).

With `gu`, the forget gradient is projected off the span of per-sample retain gradients before it is added.
Masks multiply gradients; `restore_outside_mask` resets masked-out weights to θ0 after each step (SalUn).
An objective with `edit` takes no optimiser step: `edit()` changes the weights and returns its report (SSD).
Seeds, gradient clipping, LR schedule, cancellation (`UnlearnCancelled`) and progress live here only.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from workers.engines.unlearn import gu as gu_projection
from workers.engines.unlearn.data import BatchStream, Data, to_device
from workers.engines.unlearn.errors import MissingInput, NonFinite, UnlearnCancelled
from workers.engines.unlearn.losses import (
    classifier_logits,
    compute_batch_nll,
    mean_token_nll,
    per_sample_ce,
)

log = logging.getLogger(__name__)

Loss = Callable[[nn.Module, dict[str, Tensor], int], Tensor]
Progress = Callable[[float, str], None]


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
    _reference: nn.Module | None = None

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
    forget_mask: dict[str, Tensor] | None = None
    retain_mask: dict[str, Tensor] | None = None
    restore_outside_mask: bool = False
    forget_clip: float | None = None
    trainable: list[tuple[str, nn.Parameter]] | None = None  # a subset of ctx.trainable (RMU)
    forget_data: Any = None  # replaces ctx.forget for the forget batches (paired template rows)
    edit: Callable[[], dict[str, Any]] | None = None
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


def _make_optimizer(params: Any, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    lr, decay = float(params.lr), float(params.weight_decay)
    if params.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=decay)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay)


def _schedule(optimizer: torch.optim.Optimizer, params: Any) -> torch.optim.lr_scheduler.LRScheduler:
    steps = int(params.steps)
    if params.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)


class _Trainer:
    def __init__(self, ctx: UnlearnContext, objective: Objective, params: Any) -> None:
        self.ctx, self.objective, self.params = ctx, objective, params
        named = objective.trainable if objective.trainable is not None else ctx.trainable
        if not named:
            raise MissingInput("no trainable parameter")
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        self.optimizer = _make_optimizer(params, self.parameters)
        self.scheduler = _schedule(self.optimizer, params)
        self.use_gu = bool(getattr(params, "gu", False)) and objective.forget_loss is not None
        generator = ctx.generator
        size = int(params.batch_size)
        forget = objective.forget_data if objective.forget_data is not None else ctx.forget
        self.forget = BatchStream(forget, size, generator) if objective.forget_loss and forget else None
        self.retain = BatchStream(ctx.retain, size, generator) if ctx.retain is not None else None
        if self.use_gu:
            if ctx.retain is None:
                raise MissingInput("gu needs retain rows")
            self.gu_stream = BatchStream(ctx.retain, 1, generator)
        self.anchor = None
        if objective.restore_outside_mask and objective.forget_mask is not None:
            self.anchor = [p.detach().clone() for p in self.parameters]
        self.kept: list[float] = []
        self.last: dict[str, float] = {}

    def _batch(self, stream: BatchStream | None) -> dict[str, Tensor]:
        if stream is None:
            raise MissingInput("this method needs rows it was not given")
        return to_device(stream.next(), self.ctx.device)

    def _retain_basis(self) -> Tensor:
        """Orthonormal rows spanning per-sample gradients of the task loss (CE / answer NLL) on retain rows.

        The task loss, not the method's retain term: that term may vanish at θ0 (RMU's activation MSE) or be
        weighted by α = 0, and its span would then be empty. Eval mode: no dropout, no batch-norm statistics.
        """
        loss_fn = self.ctx.task_loss
        was_training = self.ctx.model.training
        self.ctx.model.eval()
        vectors = []
        for _ in range(int(self.params.gu_retain_samples)):
            sample = to_device(self.gu_stream.next(), self.ctx.device)
            vectors.append(_flat(_grads(loss_fn(self.ctx.model, sample), self.parameters)))
        self.ctx.model.train(was_training)
        return gu_projection.orthonormal_basis(vectors)

    def _forget_grads(self, step: int) -> list[Tensor]:
        if self.objective.forget_loss is None:
            raise RuntimeError("no forget loss")
        loss = self.objective.forget_loss(self.ctx.model, self._batch(self.forget), step)
        self.last["forget_loss"] = float(loss.detach())
        grads = _grads(loss, self.parameters)
        if self.use_gu:
            flat = _flat(grads)
            projected = gu_projection.project_off(flat, self._retain_basis())
            self.kept.append(gu_projection.kept_fraction(flat, projected))
            grads = _unflat(projected, grads)
        return grads

    def _retain_grads(self, step: int) -> list[Tensor]:
        if self.objective.retain_loss is None:
            raise RuntimeError("no retain loss")
        loss = self.objective.retain_loss(self.ctx.model, self._batch(self.retain), step)
        self.last["retain_loss"] = float(loss.detach())
        return _grads(loss, self.parameters)

    def _apply(self, grads: list[Tensor], mask: dict[str, Tensor] | None, clip: float) -> None:
        for name, p, g in zip(self.names, self.parameters, grads, strict=True):
            p.grad = g * mask[name] if mask is not None and name in mask else g
        torch.nn.utils.clip_grad_norm_(self.parameters, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.anchor is not None and self.objective.forget_mask is not None:
            with torch.no_grad():
                for name, p, p0 in zip(self.names, self.parameters, self.anchor, strict=True):
                    if name in self.objective.forget_mask:
                        p.copy_(torch.where(self.objective.forget_mask[name].bool(), p, p0))

    def step(self, step: int) -> None:
        objective, clip = self.objective, float(self.params.max_grad_norm)
        if objective.forget_every == 0:
            grads: list[Tensor] | None = None
            if objective.forget_loss is not None:
                grads = self._forget_grads(step)
            if objective.retain_loss is not None:
                retain = self._retain_grads(step)
                grads = retain if grads is None else [a + b for a, b in zip(grads, retain, strict=True)]
            if grads is not None:
                self._apply(grads, objective.forget_mask, clip)
        else:
            if objective.forget_loss is not None and step % objective.forget_every == 0:
                self._apply(self._forget_grads(step), objective.forget_mask, objective.forget_clip or clip)
            if objective.retain_loss is not None:
                self._apply(self._retain_grads(step), objective.retain_mask, clip)
        self.scheduler.step()


def train(
    ctx: UnlearnContext,
    objective: Objective,
    params: Any,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run the objective for `params.steps` iterations (`params`: a validated `<Method>Params`)."""
    started = time.perf_counter()
    if objective.edit is not None:
        if should_cancel is not None and should_cancel():
            raise UnlearnCancelled(0)
        edited = objective.edit()
        return {"steps": 0, "train_seconds": time.perf_counter() - started, **edited}
    trainer = _Trainer(ctx, objective, params)
    steps = int(params.steps)
    every = max(1, steps // 100)
    ctx.model.train()
    for step in range(steps):
        if should_cancel is not None and should_cancel():
            raise UnlearnCancelled(step)
        trainer.step(step)
        if progress is not None and ((step + 1) % every == 0 or step + 1 == steps):
            progress((step + 1) / steps, "unlearning")
    ctx.model.eval()
    report: dict[str, Any] = {"steps": steps, "train_seconds": time.perf_counter() - started, **trainer.last}
    if trainer.kept:
        report["gu_kept_fraction"] = sum(trainer.kept) / len(trainer.kept)
    log.info("unlearning loop done", extra={"steps": steps, "gu": trainer.use_gu})
    return report
