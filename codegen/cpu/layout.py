"""Storage layout of reader weights on CPU, chosen at rewrite time.

A reader reads the columns of its active groups. In nn.Linear's row-major `[O, D]` storage those
columns are strided (G contiguous values per row, then a jump of D), which loses to a dense read at
decode (codegen/README.md: 0.97x at delta 0.5). Stored column-major, with the same shape, the same
values and strides (1, O), each group's columns are one contiguous `[G, O]` block. The change is
in place on the Parameter (same object, same state-dict key and values; `torch.save` keeps strides
and `load_state_dict` copies values into whatever layout the Parameter has), costs one transient
copy of the weight while it is made, and dense F.linear is as fast on either layout.

`restore_row_major` is the way back (demohdify): again one transient copy per weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["lay_out_reader_weight", "restore_row_major", "is_column_major"]


def is_column_major(weight: Tensor) -> bool:
    """True for a 2-D tensor stored as its transpose would be, contiguous: strides (1, rows)."""
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


def lay_out_reader_weight(layer: nn.Module) -> None:
    """Store `layer.weight` (an nn.Linear's `[O, D]`) column-major, in place, when it lives on the
    CPU and is row-major; anything else (CUDA, other layouts, GPT-2's Conv1D) is left as it is."""
    weight = getattr(layer, "weight", None)
    if not isinstance(layer, nn.Linear) or not isinstance(weight, Tensor) or weight.device.type != "cpu":
        return
    if weight.dim() != 2 or weight.shape[0] == 1 or not weight.is_contiguous():
        return
    with torch.no_grad():
        weight.data = weight.data.t().contiguous().t()                       # [O, D], strides (1, O)


def restore_row_major(layer: nn.Module) -> None:
    """Undo `lay_out_reader_weight`: a column-major CPU nn.Linear weight becomes row-major again."""
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and isinstance(weight, Tensor) and weight.device.type == "cpu" \
            and is_column_major(weight):
        with torch.no_grad():
            weight.data = weight.data.contiguous()                            # [O, D], strides (D, 1)
