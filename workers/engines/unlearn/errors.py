"""Typed errors of the unlearning engine; the pipeline maps each to a job error code."""

from __future__ import annotations


class UnlearnError(ValueError):
    """An unlearning job cannot run as specified (bad input, unsupported family, non-finite result)."""

    code = "unlearn_invalid"


class MissingInput(UnlearnError):
    """The method needs an input (forget, retain, tokenizer, ...) the job did not supply."""

    code = "unlearn_missing_input"


class UnsupportedFamily(UnlearnError):
    """The method does not support this model family."""

    code = "unlearn_unsupported_family"


class NonFinite(UnlearnError):
    """A loss or an updated weight became NaN/Inf; the model is not returned."""

    code = "unlearn_non_finite"


class GoalNotMet(UnlearnError):
    """The job asked for `require_goal` and the run did not reach its goal (the message says why)."""

    code = "goal_not_met"


class UnlearnCancelled(Exception):
    """`should_cancel()` returned True between two steps; `steps_done` steps had been taken."""

    code = "cancelled"

    def __init__(self, steps_done: int) -> None:
        super().__init__(f"unlearning cancelled after {steps_done} steps")
        self.steps_done = steps_done
