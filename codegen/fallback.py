"""The one rule for the CUDA side of every MoHD op: inputs the Triton kernels cannot take (e.g. a
group size that is not a multiple of 16) run the reference with a warning that says why, rather
than failing inside a model. Each op's CUDA kernel calls `kernel_or_reference`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

__all__ = ["kernel_or_reference"]

R = TypeVar("R")


def kernel_or_reference(op: str, check: Callable[[], object], kernel: Callable[[], R],
                        reference: Callable[[], R]) -> R:
    """`kernel()` when `check()` raises no ValueError; otherwise warn "<op> on CUDA runs the reference
    path: <why>" and return `reference()`. The launchers are imported lazily by the callers (Triton is
    optional on CPU), so `check` and `kernel` are thunks."""
    try:
        check()
    except ValueError as err:
        warnings.warn(f"{op} on CUDA runs the reference path: {err}", stacklevel=3)
        return reference()
    return kernel()
