"""Robustness probes: does the forgetting survive weight quantization, or a few steps of relearning?

- `quantize` — round-to-nearest, symmetric, per output channel: every floating weight with two or more
  dimensions (linear, convolution and embedding weights; biases and norms stay) of a copy of the result is
  replaced by s·round(W/s), s = max|W_row| / (2^(b−1) − 1), at int8 and at int4. A PeftModel is merged first
  (`merge_and_unload`), so the adapter's change is quantized with the base, as a deployment would. 4-bit
  quantization brought back most forgotten knowledge of unlearned LLMs in "Catastrophic Failure of LLM
  Unlearning via Quantization" (ICLR 2025): the small unlearning update rounds back onto the original grid.
- `relearn` — `RELEARN_STEPS` AdamW steps of the task loss (CE / answer NLL) at the run's learning rate on a
  seeded `RELEARN_FRACTION` of the forget rows (at least one row, and at least one left), on a copy; then the
  forget metrics are measured on the forget rows it did not train on.

Each probe re-measures the before/after figures (`metrics.evaluate`) and the goal's forget conditions
(`goal.GoalCheck`, on the full splits). A probe is `robust: false` when the forget conditions held before it
and no longer hold after it — the forgetting came back past the goal; `robust: null` when they did not hold
to begin with (the run did not meet its goal: there is nothing to bring back). The report's `robust` is false
when any probe is. With a retrained reference the relearning probe also runs on it (`reference`): a model
that never saw the forget rows learns them too, so compare the two before reading `robust: false` as a leak.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from app.schemas.unlearn import UnlearnGoal
from workers.engines.unlearn.data import BatchStream, Data, to_device
from workers.engines.unlearn.errors import UnlearnCancelled
from workers.engines.unlearn.goal import GoalCheck
from workers.engines.unlearn.losses import classifier_logits, compute_batch_nll, mean_token_nll, per_sample_ce
from workers.engines.unlearn.metrics import evaluate

QUANTIZE_BITS = (8, 4)
RELEARN_STEPS = 10
RELEARN_FRACTION = 0.1
RELEARN_BATCH = 32
RELEARN_LR = 1e-3  # when the run has no learning rate (an edit such as SSD)


def _merged(model: nn.Module) -> nn.Module:
    """A copy of the model with any LoRA merged into its weights."""
    duplicate = copy.deepcopy(model)
    merge: Any = getattr(duplicate, "merge_and_unload", None)
    return merge() if callable(merge) else duplicate


@torch.no_grad()
def quantize_weights(model: nn.Module, bits: int) -> int:
    """Round every ≥2-D floating weight to `bits`-bit symmetric per-output-channel levels, in place; returns how
    many tensors were quantized."""
    levels = 2 ** (bits - 1) - 1
    count = 0
    for parameter in model.parameters():
        if parameter.ndim < 2 or not parameter.is_floating_point():
            continue
        rows = parameter.reshape(parameter.shape[0], -1)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
        parameter.copy_((torch.round(rows / scale).clamp(-levels, levels) * scale).reshape(parameter.shape))
        count += 1
    return count


def _forget_state(check: GoalCheck, model: nn.Module) -> dict[str, Any]:
    measured = check.measure(model, full=True)
    return {
        "forget_conditions_met": measured.goal_met,
        "values": measured.values,
        "targets": {name: target for name, _, target in measured.conditions},
        "unmet": measured.unmet,
    }


def _robust(before: dict[str, Any], after: dict[str, Any]) -> bool | None:
    if not before["forget_conditions_met"]:
        return None
    return bool(after["forget_conditions_met"])


def _task_loss(model: nn.Module, family: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if family == "classifier":
        return per_sample_ce(classifier_logits(model, batch), batch["labels"]).mean()
    return mean_token_nll(*compute_batch_nll(model, batch))


def relearn(model: nn.Module, family: str, rows: Data, lr: float, seed: int, device: torch.device) -> nn.Module:
    """A copy of `model` after `RELEARN_STEPS` AdamW steps of the task loss on `rows`."""
    learner = copy.deepcopy(model)
    parameters = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    stream = BatchStream(rows, RELEARN_BATCH, torch.Generator().manual_seed(seed))
    learner.train()
    for _ in range(RELEARN_STEPS):
        loss = _task_loss(learner, family, to_device(stream.next(), device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    learner.eval()
    return learner


def split_forget(forget: Data, seed: int) -> tuple[Data, Data]:
    """(a seeded `RELEARN_FRACTION` of the forget rows — at least one — , the rest — at least one)."""
    count = min(len(forget) - 1, max(1, math.ceil(RELEARN_FRACTION * len(forget))))
    order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(seed + 104729), device="cpu").tolist()
    return forget.subset(sorted(order[:count])), forget.subset(sorted(order[count:]))


def run_probes(
    model: nn.Module,
    family: str,
    probes: Sequence[str],
    forget: Data | None,
    retain: Data | None,
    evaluation: Data | None,
    report: dict[str, Any],
    goal: UnlearnGoal,
    reference: nn.Module | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Each probe's figures and verdict (see the module docstring), keyed by probe name."""
    device = next(model.parameters()).device
    seed = int(report["params"].get("seed", 0))
    out: dict[str, Any] = {}
    if forget is None:
        return {name: {"robust": None, "skipped": "no forget rows"} for name in probes}
    check = GoalCheck.build(model, family, forget, retain, evaluation, goal, seed, device)
    if not check.measurable:
        return {name: {"robust": None, "skipped": f"the goal cannot be measured: {check.why_not}"} for name in probes}
    unlearned = _forget_state(check, model)
    for name in probes:
        if should_cancel is not None and should_cancel():
            raise UnlearnCancelled(0)
        if name == "quantize":
            out[name] = {}
            for bits in QUANTIZE_BITS:
                quantized = _merged(model)
                tensors = quantize_weights(quantized, bits)
                state = _forget_state(check, quantized)
                out[name][f"int{bits}"] = {
                    "quantized_tensors": tensors,
                    "after": evaluate(quantized, family, forget, retain, evaluation, device, seed),
                    "goal": state,
                    "robust": _robust(unlearned, state),
                }
                del quantized
            verdicts = [v["robust"] for v in out[name].values()]
            out[name]["robust"] = None if all(v is None for v in verdicts) else all(v is not False for v in verdicts)
        elif name == "relearn":
            if len(forget) < 2:
                out[name] = {"robust": None, "skipped": "relearning needs at least two forget rows"}
                continue
            taught, rest = split_forget(forget, seed)
            rest_check = GoalCheck.build(model, family, rest, retain, evaluation, goal, seed, device)
            lr = float(report.get("goal", {}).get("lr") or RELEARN_LR)
            before = _forget_state(rest_check, model)
            learner = relearn(model, family, taught, lr, seed, device)
            after = _forget_state(rest_check, learner)
            out[name] = {
                "rows": len(taught),
                "measured_on": len(rest),
                "steps": RELEARN_STEPS,
                "lr": lr,
                "before": before,
                "after": after,
                "after_metrics": evaluate(learner, family, rest, retain, evaluation, device, seed),
                "robust": _robust(before, after),
            }
            if reference is not None:
                relearned_reference = relearn(reference, family, taught, lr, seed, device)
                out[name]["reference"] = {
                    "before": _forget_state(rest_check, reference),
                    "after": _forget_state(rest_check, relearned_reference),
                }
            del learner
        else:
            out[name] = {"robust": None, "skipped": f"unknown probe {name!r}"}
    return out
