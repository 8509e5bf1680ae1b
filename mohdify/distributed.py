"""Sharding a mohdified model (FSDP2 `fully_shard`, and other tools that need contiguous Parameters).

On CPU, `mohdify()` stores reader weights column-major (`codegen/cpu/layout.py`: strides (1, O), so
each group's columns are one contiguous block for the CPU decode kernels). FSDP2 refuses
non-contiguous Parameters ("FSDP does not support non-contiguous parameters yet"), so call
`mohdify.contiguous(model)` before `fully_shard`: it stores them row-major again, in place (same
Parameters, values and state dict). Results are unchanged; only CPU decode speed gives back the
layout's gain. Tested: `tests/mohdify/test_fsdp.py` (2 processes, gloo, one training step equal to
one process).
"""

from __future__ import annotations

from torch import nn

from mohdify.codegen.cpu.layout import restore_row_major
from mohdify.passes import is_mohdified

from .errors import UnsupportedModelError
from .modules import MoHDReader

__all__ = ["contiguous"]


def contiguous(model: nn.Module) -> nn.Module:
    """Store every MoHD reader weight of `model` row-major (contiguous), in place; returns `model`.

    Example::

        mohdify.contiguous(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    """
    if not is_mohdified(model):
        raise UnsupportedModelError(f"contiguous: {type(model).__name__} is not mohdified; its Parameters are as "
                                    "the model made them.")
    for module in model.modules():
        if isinstance(module, MoHDReader):
            restore_row_major(module.original)   # module.original.weight is module.weight (same Parameter)
    return model
