"""A training-free baseline for MoHD conversion (used only for comparison): per-element input sparsity in the
style of TEAL. Every linear a MoHD rewrite would sparsify (the branches' readers and writers, from the plan)
keeps, per token, the largest-magnitude `keep` share of its input elements and zeroes the rest, so it reads
`keep` of its weight columns: the same weight traffic per token as MoHD at density delta = keep (readers read
delta of their columns, writers write delta of their rows). Unlike MoHD, the kept elements are chosen per
element and per linear, not per group of the stream and per branch.

    with input_sparsity(model, keep=0.75, example_inputs=batch):
        out = model(**batch)
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

import mohdify


def keep_largest(x: torch.Tensor, keep: float) -> torch.Tensor:
    """x with all but the ceil(keep * n) largest-magnitude elements of each row (last dim n) set to zero."""
    n = x.shape[-1]
    k = min(n, max(1, math.ceil(keep * n - 1e-9)))
    idx = x.abs().topk(k, dim=-1).indices                                   # [..., k]
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


@contextlib.contextmanager
def input_sparsity(model: nn.Module, keep: float, example_inputs):
    """Within the block, the plan's readers and writers see inputs sparsified by `keep_largest`."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}.")
    plan = mohdify.explain(model, example_inputs, mohdify.MoHDConfig.dense(num_groups=1, num_shared=0,
                                                                            router="magnitude"))
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda m, args: (keep_largest(args[0], keep), *args[1:]))
               for n in plan.readers + plan.writers]
    try:
        yield plan
    finally:
        for h in handles:
            h.remove()
