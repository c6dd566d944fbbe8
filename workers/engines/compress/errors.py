"""Typed errors of the compression engine.

`CompressInputError` is raised before any compute when the inputs cannot be compressed as asked (it names the
module); `CompressNumericError` when a result holds NaN or Inf (e.g. values past float16's range).
"""

from __future__ import annotations


class CompressInputError(ValueError):
    """The adapter, models, parameters or output rule cannot be compressed as asked; the message says why."""


class CompressNumericError(ArithmeticError):
    """A compressed module contains NaN or Inf values."""
