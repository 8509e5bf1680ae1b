"""How every MoHD op reaches its kernel on each device.

`register_devices` registers an op's CPU kernel (codegen/cpu) and CUDA kernel (Triton) in one call.
`kernel_or_reference` is the one rule for the CUDA side: inputs the Triton kernels cannot take (e.g. a
group size that is not a multiple of 16) run the reference with a warning that says why, rather
than failing inside a model. Each op's CUDA kernel calls it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

from .contracts import ContractError

__all__ = ["register_devices", "kernel_or_reference"]

R = TypeVar("R")


def register_devices(op, *, cpu: Callable, cuda: Callable) -> None:
    """Register `cpu` and `cuda` as the kernels of the custom op `op` (a torch.library CustomOpDef);
    other devices run the op's reference body."""
    op.register_kernel("cpu")(cpu)
    op.register_kernel("cuda")(cuda)


def kernel_or_reference(op: str, check: Callable[[str], object], kernel: Callable[[], R],
                        reference: Callable[[], R]) -> R:
    """`kernel()` when `check(op)` raises no ValueError; otherwise warn "<op> on CUDA runs the reference
    path: <why>" and return `reference()`. The launchers are imported lazily by the callers (Triton is
    optional on CPU), so `check` and `kernel` are thunks."""
    try:
        check(op)
    except ValueError as err:
        why = err.what if isinstance(err, ContractError) else err
        warnings.warn(f"{op} on CUDA runs the reference path: {why}", stacklevel=3)
        return reference()
    return kernel()
