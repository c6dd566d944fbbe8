"""Typed errors of the merge engine.

`MergeInputError` is raised before any compute when the inputs cannot be merged (it names the module);
`MergeNumericError` is raised when a result holds NaN or Inf.
"""

from __future__ import annotations


class MergeInputError(ValueError):
    """The adapters, parameters or output spec cannot be merged; the message names the module."""


class MergeNumericError(ArithmeticError):
    """A merged module contains NaN or Inf values."""
