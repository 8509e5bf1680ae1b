"""CPU kernel of `mohdify::write` / `mohdify::write_add`: only the output rows of active groups.

A writer weight `[D, I]` in nn.Linear's row-major layout already keeps each group's rows
W[group] as one contiguous `[G, I]` block, so no re-layout is needed: one matmul per run of
consecutive active groups reads exactly the active rows, writes them into their slice of the
output, and the gates, fusion and residual follow on the `[T, D]` result (cheap next to the
weight reads). Rows of groups that no token uses are zero and their weights are never read.

Decode (T <= 16 tokens) runs the native kernel (`native.py`: the rows, bias, gates and residual in
one C call) where it is available and takes the inputs (it checks what it relies on itself; the full
checks of codegen/contracts.py run when it does not take the call); the torch loop is its fallback.

Shape legend: T = tokens, I = in_features, D = out_features = N * G, N = groups, G = group size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..contracts import check_write
from ..write.naive import write_naive
from . import grouped, native
from .plan import GroupPlan, plan_groups, runs

__all__ = ["write_cpu", "write_add_cpu"]


def _rows(o: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], a: int, b: int, group_size: int) -> None:
    """o[:, rows] = u @ W[rows].T (+ b[rows]) for the rows of groups [a, b)."""
    rows = slice(a * group_size, b * group_size)
    if u.shape[0] == 1:   # a GEMV: measured ~15% faster than the [1, I] x [I, G] matmul
        if bias is None:
            torch.mv(weight[rows], u[0], out=o[0, rows])                      # [(b-a)G]
        else:
            torch.addmv(bias[rows], weight[rows], u[0], out=o[0, rows])       # [(b-a)G]
    elif bias is None:
        torch.mm(u, weight[rows].t(), out=o[:, rows])                         # [T, (b-a)G]
    else:
        torch.addmm(bias[rows], u, weight[rows].t(), out=o[:, rows])          # [T, (b-a)G]


def _gate_and_mix(o: Tensor, gates: Tensor, fusion: Optional[Tensor], used: list[int]) -> Tensor:
    """o * gates per group, then group fusion over the used groups only (the others are zero)."""
    num_tokens, num_groups = gates.shape
    o3 = o.view(num_tokens, num_groups, -1)                                   # [T, N, G]
    o3.mul_(gates[:, :, None].to(o.dtype))                                    # [T, N, G]
    if fusion is None:
        return o
    idx = torch.tensor(used, dtype=torch.long)                                # [|U|]
    mixed = torch.einsum("ij,tjg->tig", fusion[:, idx].to(o.dtype), o3[:, idx])  # [T, N, G]
    return mixed.reshape(num_tokens, -1)                                      # [T, D]


def _write_decode(u, weight, bias, gates, fusion, plan: GroupPlan, group_size: int) -> Tensor:
    o = u.new_zeros(u.shape[0], weight.shape[0])                              # [T, D]
    for a, b in runs(plan.used):
        _rows(o, u, weight, bias, a, b, group_size)
    return _gate_and_mix(o, gates, fusion, plan.used)


def _write_grouped(u, weight, bias, gates, fusion, plan: GroupPlan, group_size: int) -> Tensor:
    o = u.new_zeros(u.shape[0], weight.shape[0])                              # [T, D]
    for a, b in runs(plan.full):
        _rows(o, u, weight, bias, a, b, group_size)
    if grouped.takes(u, weight, bias, o):                                   # the partial groups in one native call
        grouped.dot(o, u, weight, bias, grouped.csr(plan), group_size)
        return _gate_and_mix(o, gates, fusion, plan.used)
    for g in plan.partial:
        rows = slice(g * group_size, (g + 1) * group_size)
        idx = plan.tokens_of[g]                                               # [T_g]
        w = weight[rows].t()                                                  # [I, G]
        part = torch.mm(u[idx], w) if bias is None else torch.addmm(bias[rows], u[idx], w)  # [T_g, G]
        o[idx, rows] = part
    return _gate_and_mix(o, gates, fusion, plan.used)


def write_cpu(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor]) -> Tensor:
    """CPU kernel of `mohdify::write`, `[T, I]` -> `[T, D]`; equals `write_naive` (module docstring)."""
    if (o := native.write(u, weight, bias, gates, fusion, None)) is not None:
        return o                                                              # [T, D], one native call
    group_size = check_write("mohdify::write", u, weight, bias, gates, fusion)
    return _write(u, weight, bias, gates, fusion, group_size)


def _write(u, weight, bias, gates, fusion, group_size: int) -> Tensor:
    if u.shape[0] == 0:
        return u.new_zeros(0, weight.shape[0])
    plan = plan_groups(gates != 0, u.dtype, "write", group_size, grouped.takes(u, weight, bias))
    if plan.path == "dense":
        return write_naive(u, weight, bias, gates, fusion)                    # [T, D]
    if plan.path == "decode":
        return _write_decode(u, weight, bias, gates, fusion, plan, group_size)
    return _write_grouped(u, weight, bias, gates, fusion, plan, group_size)


def write_add_cpu(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor],
                  residual: Tensor) -> Tensor:
    """CPU kernel of `mohdify::write_add`: `write_cpu(...) + residual`, bit for bit the separate ops
    (the native decode kernel adds the residual after rounding the write, as the separate add does)."""
    if (o := native.write(u, weight, bias, gates, fusion, residual)) is not None:
        return o                                                              # [T, D], the add in the same call
    group_size = check_write("mohdify::write_add", u, weight, bias, gates, fusion, residual)
    return _write(u, weight, bias, gates, fusion, group_size) + residual      # [T, D]
