"""How long, and how fast, an unlearning run trains: goal-driven (the default) or a fixed number of steps.

- **Goal-driven** (`steps` null). The learning rate is the method's `lr`, or, when that is null, the one a
  short range test picks: from the same starting state, `PROBE_STEPS` steps at rates of a geometric ladder
  (`LR_LADDER`), each probe measured against the goal. It starts in the ladder's middle and climbs while the
  guards hold and the probes forget no less, or descends until they hold; a probe that already meets the
  goal with the guards kept ends the run there, else the rate whose probe came closest to the goal while
  keeping the guards wins (ties, within `TIE_POINTS`, go to the larger rate), as people tune by hand.
  Then the loop trains and checks goal and guards on the `GoalCheck`'s seeded subsets every `check_every`
  steps, keeping a copy of the best state that keeps the guards (smallest shortfall). It stops as soon as
  a check meets the goal and the full splits confirm it. The learning rate is constant between changes:
  - halved when a guard is broken at `BROKEN_PATIENCE` checks that do not see it recovering (its deficit
    shrinking below `RECOVERY` of the previous check's) — from where the run is, so that a retain term can
    repair the state (annealing), or from the best state when a loss turned NaN/Inf, the method has no
    retain term, or the previous halving repaired nothing; after `MAX_HALVINGS` the run stops ("guard");
  - doubled, from where the run is, when `STALL_CHECKS` checks in a row keep the guards without a better
    state (at most `MAX_DOUBLINGS` times; then it stops: "no_progress").
  It also stops when the step budget (`max_steps`, range test included) or the time budget (`max_seconds`)
  runs out. The state returned is the best one that kept the guards — the input model itself if nothing
  better did. A method's own schedule (SFR-on's α_t, l1_sparse's decay) spans `GOAL_HORIZON` iterations and
  restarts with each change of rate (each is a fresh segment of the run).
- **Repair** (goal-driven, `repair_steps` > 0): once the goal is met (in the loop or by a range-test probe), the
  method's retain term alone trains for up to `repair_steps` steps at `REPAIR_LR_FACTOR` × the run's rate, from
  the state that met the goal, checked every `check_every` steps; the state whose guards have the most room among
  those that still meet the goal (confirmed on the full splits) is returned. Stopping at the first state that
  meets the goal leaves the retain damage the forgetting took, up to the guard; a few retain steps undo most of
  it without relearning the forget rows (the goal is re-checked).
- **Fixed** (`steps` given): exactly `steps` iterations with `lr_schedule` over them, as before goal-driven
  runs existed (with `lr` null, at the rate the range test picks). The goal is measured and reported only.
- A goal that cannot be measured (no eval rows where it needs them) with `steps` null: `FALLBACK_STEPS`
  steps at `lr` (or `FALLBACK_LR`), reported as not met with the reason.
- An `edit` objective (SSD) takes no step; goal-driven, it is handed a judge of the goal and guards (its α search).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from workers.engines.unlearn.errors import NonFinite, UnlearnCancelled
from workers.engines.unlearn.goal import Check, GoalCheck
from workers.engines.unlearn.loop import Objective, UnlearnContext, _Trainer, restore, snapshot

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

LR_LADDER = {
    "adamw": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "sgd": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
}
FALLBACK_LR = {"adamw": 1e-4, "sgd": 1e-2}
FALLBACK_STEPS = 50
LADDER_START = 4  # the range test starts at 1e-3 (AdamW) / 1e-2 (SGD)
PROBE_STEPS = 20
TIE_POINTS = 0.5
BROKEN_PATIENCE = 3
RECOVERY = 0.9  # a broken guard whose deficit shrank below this fraction of the last check's is recovering
MAX_HALVINGS = 4
STALL_CHECKS = 10
MAX_DOUBLINGS = 3
GOAL_HORIZON = 300  # goal-driven: the iterations a method's own schedule (SFR-on's α_t, l1's decay) spans
# repair steps run at this fraction of the run's rate: at the forgetting rate itself (and at a third of it) the
# retain steps relearned the forget rows of bench/deletion_bench.py's tiny LM within 10 steps (the goal broke),
# at a tenth they took the retain NLL from +0.094 back to +0.005 nats with the goal kept
REPAIR_LR_FACTOR = 0.1


@dataclass
class _Run:
    """The state of one run, shared by the range test and the loop."""

    ctx: UnlearnContext
    objective: Objective
    params: Any
    check: GoalCheck
    budget: int
    deadline: float
    progress: Progress | None
    should_cancel: Callable[[], bool] | None
    started: float = field(default_factory=time.perf_counter)
    steps_taken: int = 0  # every optimiser iteration, range test included
    checks: int = 0
    check_seconds: float = 0.0
    anchor: Any = None
    fixed: bool = False

    def trainer(self, lr: float) -> _Trainer:
        horizon = self.ctx.horizon if self.fixed else 0  # 0: constant rate, this controller changes it
        trainer = _Trainer(self.ctx, self.objective, self.params, lr, horizon, self.anchor)
        self.anchor = trainer.anchor  # θ0 for `restore_outside_mask`, whatever state a later trainer starts from
        return trainer

    def tick(self, trainer: _Trainer, step: int) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise UnlearnCancelled(self.steps_taken)
        trainer.step(step)
        self.steps_taken += 1
        if self.progress is not None and self.steps_taken % max(1, self.budget // 100) == 0:
            elapsed = (time.perf_counter() - self.started) / max(self.deadline - self.started, 1e-9)
            self.progress(min(1.0, max(self.steps_taken / self.budget, elapsed)), "unlearning")

    def measure(self) -> Check:
        self.checks += 1
        started = time.perf_counter()
        try:
            return self.check.measure(self.ctx.model)
        finally:
            self.check_seconds += time.perf_counter() - started

    def confirm(self) -> Check:
        self.checks += 1
        started = time.perf_counter()
        try:
            return self.check.measure(self.ctx.model, full=True)
        finally:
            self.check_seconds += time.perf_counter() - started

    def out_of_budget(self) -> str | None:
        if self.steps_taken >= self.budget:
            return "max_steps"
        if time.perf_counter() >= self.deadline:
            return "max_seconds"
        return None


def run(
    ctx: UnlearnContext,
    objective: Objective,
    params: Any,
    check: GoalCheck,
    start: Check | None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train `objective` (fixed or goal-driven, see the module docstring); returns the loop's report."""
    goal = check.goal
    started = time.perf_counter()
    fixed = params.steps is not None
    budget = int(params.steps) if fixed else goal.max_steps
    state = _Run(ctx, objective, params, check, budget, started + goal.max_seconds, progress, should_cancel)
    if objective.edit is not None:
        if should_cancel is not None and should_cancel():
            raise UnlearnCancelled(0)
        goal_driven = not fixed and check.measurable and start is not None
        edited = objective.edit((lambda full: state.confirm() if full else state.measure()) if goal_driven else None)
        return {
            "mode": "edit",
            "steps": 0,
            "train_seconds": time.perf_counter() - started,
            "checks": state.checks,
            "check_seconds": state.check_seconds,
            **edited,
        }
    state.fixed = fixed
    report: dict[str, Any] = {"mode": "fixed" if fixed else "goal"}
    ctx.model.train()
    lr = params.lr
    if lr is None and check.measurable and start is not None:
        lr, search, done, probe = _range_test(state)
        report.update(lr_search=search, lr_search_steps=state.steps_taken)
        if done is not None:  # a probe met the goal keeping the guards: that state is the result
            done = _repair(state, report, lr, done)
            return _finish(state, report, lr, None, done, "goal", steps=probe)
    lr = float(lr if lr is not None else FALLBACK_LR[params.optimizer])
    if fixed or not check.measurable or start is None:
        steps = budget if fixed else min(FALLBACK_STEPS, budget)
        trainer = state.trainer(lr)
        for step in range(steps):
            state.tick(trainer, step)
        stopped = "steps" if fixed else "unmeasurable"
        last = state.measure() if check.measurable else None
        return _finish(state, report, lr, trainer, last, stopped, steps=steps)
    return _goal_loop(state, report, lr, start)


def _range_test(state: _Run) -> tuple[float, list[dict[str, Any]], Check | None, int]:
    """Probe rates of the ladder from the same start, climbing from its middle; see the module docstring."""
    ctx = state.ctx
    named = _named(state)
    origin = snapshot(ctx.model, named)
    ladder = LR_LADDER[state.params.optimizer]
    probe = max(1, min(PROBE_STEPS, state.budget // (2 * len(ladder))))
    results: dict[int, Check | None] = {}
    search: list[dict[str, Any]] = []

    def kept(index: int) -> bool:
        checked = results.get(index)
        return checked is not None and checked.guards_ok

    def try_rate(index: int) -> Check | None:
        trainer = state.trainer(ladder[index])
        try:
            for step in range(probe):
                state.tick(trainer, step)
            checked: Check | None = state.measure()
        except NonFinite:
            checked = None
        results[index] = checked
        search.append(
            {"lr": ladder[index], "shortfall": checked.shortfall, "guards_ok": checked.guards_ok}
            if checked is not None
            else {"lr": ladder[index], "non_finite": True}
        )
        if checked is not None and checked.goal_met and checked.guards_ok:
            confirmed = state.confirm()
            if confirmed.goal_met and confirmed.guards_ok:
                return checked  # this state is the result: no restore
        restore(ctx.model, named, origin)
        ctx.model.train()
        return None

    index = LADDER_START
    done = try_rate(index)
    step = 1 if kept(index) else -1  # climb while the guards hold, descend until they do
    while done is None and 0 <= index + step < len(ladder) and not state.out_of_budget():
        previous = results[index]
        index += step
        done = try_rate(index)
        if step < 0 and kept(index):
            break
        if step > 0 and not kept(index):
            break
        current = results[index]
        if (
            step > 0
            and previous is not None
            and current is not None
            and current.shortfall > previous.shortfall + TIE_POINTS
        ):
            break  # a larger step forgets less: past the best rate
    if done is not None:
        return ladder[index], search, done, probe
    good = [(ladder[i], c) for i, c in results.items() if c is not None and c.guards_ok]
    if not good:
        return ladder[min(results)], search, None, probe
    best = min(c.shortfall for _, c in good)
    return max(lr for lr, c in good if c.shortfall <= best + TIE_POINTS), search, None, probe


def _named(state: _Run) -> list[tuple[str, Any]]:
    return state.objective.trainable if state.objective.trainable is not None else state.ctx.trainable


def _goal_loop(state: _Run, report: dict[str, Any], lr: float, start: Check) -> dict[str, Any]:
    ctx, goal = state.ctx, state.check.goal
    named = _named(state)
    best, best_state, best_step = start, snapshot(ctx.model, named), 0
    trainer = state.trainer(lr)
    step = broken = halvings = doublings = stall = 0
    annealing = False  # the last halving kept the state it broke the guard in
    previous: Check | None = None
    stopped: str | None = None
    last: Check | None = None
    while stopped is None:
        stopped = state.out_of_budget()
        if stopped is not None:
            break
        try:
            state.tick(trainer, trainer.count)  # a method's own schedule restarts with each new rate
            step += 1
            if step % goal.check_every:
                continue
            last = state.measure()
        except NonFinite:  # the rate is too high for this state: like a broken guard, at once
            last, broken = None, BROKEN_PATIENCE - 1
        log.debug(
            "goal check",
            extra={"step": step, "lr": lr, "check": None if last is None else last.as_dict()},
        )
        if last is not None and last.guards_ok:
            broken, annealing = 0, False
            if last.shortfall < best.shortfall:
                best, best_state, best_step, stall = last, snapshot(ctx.model, named), step, 0
            else:
                stall += 1
            if last.goal_met:
                confirmed = state.confirm()  # the subsets say met: the full splits decide
                if confirmed.goal_met and confirmed.guards_ok:
                    stopped = "goal"
                    break
        else:
            recovering = last is not None and previous is not None and last.deficit < RECOVERY * previous.deficit
            broken = broken if recovering else broken + 1
            if broken >= BROKEN_PATIENCE:
                if halvings == MAX_HALVINGS:
                    stopped = "guard"
                    break
                # a smaller rate lets a retain term repair the state it reached; back to the best state when
                # nothing can repair it (NaN, no retain term) or the last halving did not
                annealed = last is not None and state.objective.retain_loss is not None and not annealing
                if not annealed:
                    restore(ctx.model, named, best_state)
                    ctx.model.train()
                lr, halvings, broken, annealing = lr / 2, halvings + 1, 0, annealed
                trainer = state.trainer(lr)
        previous = last
        if stall >= STALL_CHECKS:
            if doublings == MAX_DOUBLINGS:
                stopped = "no_progress"
            else:  # the guards hold but nothing moves: a larger step, from where the run is
                lr, doublings, stall = lr * 2, doublings + 1, 0
                trainer = state.trainer(lr)
    if stopped != "goal":
        restore(ctx.model, named, best_state)
    elif last is not None:
        best = _repair(state, report, lr, last)
    report.update(lr_halvings=halvings, lr_doublings=doublings)
    return _finish(state, report, lr, trainer, best, stopped, steps=step, best_step=best_step)


def _room(check: Check) -> float:
    """How far the worst guard is from its bound (points, nats): more is less retain damage."""
    return -check.deficit


def _repair(state: _Run, report: dict[str, Any], lr: float, met: Check) -> Check:
    """The goal is met: train the retain term alone for up to `repair_steps` steps (see the module docstring);
    returns the check of the state kept (the model is left in it)."""
    goal, ctx = state.check.goal, state.ctx
    if goal.repair_steps <= 0 or state.objective.retain_loss is None:
        return met
    named = _named(state)
    met_state = snapshot(ctx.model, named)
    kept, kept_state, taken, kept_steps = met, met_state, 0, 0
    retain_only = replace(state.objective, forget_loss=None, forget_every=0, passes=False)
    trainer = _Trainer(ctx, retain_only, state.params, lr * REPAIR_LR_FACTOR, 0, state.anchor)
    ctx.model.train()
    while taken < goal.repair_steps and state.out_of_budget() is None:
        try:
            for _ in range(min(goal.check_every, goal.repair_steps - taken)):
                state.tick(trainer, trainer.count)
                taken += 1
        except NonFinite:
            break
        checked = state.measure()
        if not (checked.goal_met and checked.guards_ok) or _room(checked) <= _room(kept):
            break  # the goal broke, or the retain figures stopped improving
        kept, kept_state, kept_steps = checked, snapshot(ctx.model, named), taken
    restore(ctx.model, named, kept_state)
    if kept_steps:
        confirmed = state.confirm()
        if not (confirmed.goal_met and confirmed.guards_ok):  # the full splits disagree: back to the met state
            restore(ctx.model, named, met_state)
            kept, kept_steps = met, 0
    ctx.model.train()
    report.update(repair_steps=taken, repair_kept_steps=kept_steps)
    return kept


def _finish(
    state: _Run,
    report: dict[str, Any],
    lr: float,
    trainer: _Trainer | None,
    result: Check | None,
    stopped: str,
    steps: int = 0,
    best_step: int | None = None,
) -> dict[str, Any]:
    state.ctx.model.eval()
    report.update(
        steps=steps,
        total_steps=state.steps_taken,
        lr=lr,
        checks=state.checks,
        check_seconds=state.check_seconds,
        stopped_by=stopped,
        train_seconds=time.perf_counter() - state.started,
    )
    if best_step is not None:
        report["best_step"] = best_step
    if result is not None:
        report["check"] = result.as_dict()
    if trainer is not None:
        report.update(trainer.last)
        if trainer.kept:
            report["gu_kept_fraction"] = sum(trainer.kept) / len(trainer.kept)
    log.info("unlearning run done", extra={"steps": state.steps_taken, "stopped_by": stopped, "lr": lr})
    return report
