"""Autocast for the MoHD matmul ops: `mohdify::read`, `read_multi`, `write`, `write_add`.

Under `torch.autocast(device, dtype)` a dense `F.linear` runs in the autocast dtype; these ops do
the same: their floating-point inputs (x or u, weights, biases, alpha, gates, fusion) are cast to
the autocast dtype of the device in force, and the op runs with autocast off, so forward and
backward see one dtype. `write_add`'s residual keeps its dtype (the dense model's `h + o` promotes
to it too). `mohdify::route` takes scores and indices only and is left alone. Registered for every
device type torch has autocast for that this build knows (CPU and CUDA here), reading the dtype at
call time, so fp16 and bf16 both work.
"""

from __future__ import annotations

from typing import Any

import torch

from . import read, write  # noqa: F401 - the ops must exist before their autocast rules

__all__ = ["AUTOCAST_OPS"]

# op name -> number of leading arguments cast (write_add's last argument, the residual, is not)
AUTOCAST_OPS = {"read": 5, "read_multi": 5, "write": 5, "write_add": 5}

_LIB = torch.library.Library("mohdify", "IMPL")


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _register(name: str, cast_count: int, device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = getattr(torch.ops.mohdify, name).default

    def run(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = (*_cast(args[:cast_count], dtype), *args[cast_count:])
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args)

    op.py_impl(key)(run)   # the path taken under Python dispatch (tracing, fake tensors)
    _LIB.impl(name, lambda _keyset, *args: run(*args), key_name, with_keyset=True)


for _device in ("cpu", "cuda"):
    if torch._C._is_autocast_available(_device):
        for _name, _count in AUTOCAST_OPS.items():
            _register(_name, _count, _device)
