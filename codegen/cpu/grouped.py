"""The native many-token kernels (grouped.c) of the grouped CPU path: the partial groups of a call.

The grouped path (plan.py) runs the groups every token uses as torch matmuls over all tokens; the
groups only some tokens use go here, when the native library is built (native.py) and the call is
fp32. Each kernel reads its tokens' rows in place through their indices and computes only the active
(token, group) pairs, so a group costs its share of the dense work, without the gathered copies and
`index_add` of the torch loop (which stays the fallback: same numbers up to fp32 summation order).

  acc(y, x, wt, csr)    y[t] += x[t, group] @ wt[group rows]        (reader forward, writer grad_u)
  dot(out, a, w, csr)   out[t, group] = a[t] @ w[group rows]^T + b  (writer forward / z, reader grad_x)
  wgrad(out, p, q, csr) out[group rows] = p[T_g, group]^T @ q[T_g]  (both weight gradients)

`csr(plan)` lists the plan's partial groups and their tokens once per call. `calls` counts the
kernel calls per kind (tests assert which path ran).

Shape legend: T = tokens, G = group size, T_g = the tokens of group g.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import native
from .plan import GroupPlan

__all__ = ["Csr", "csr", "plan_lists", "available", "takes", "acc", "dot", "wgrad", "calls", "MAX_GROUPS"]

calls: Counter = Counter()   # "acc" / "dot" / "wgrad": native calls made
MAX_GROUPS = 4096            # partial groups one acc call takes (grouped.c MAX_SEL); plan.py checks it


class Csr(NamedTuple):
    gid: Tensor   # [S] int64: the partial groups
    off: Tensor   # [S + 1] int64: group s's tokens are tok[off[s]:off[s + 1]]
    tok: Tensor   # [sum T_g] int64, ascending per group


def plan_lists(active: Tensor) -> tuple[list[int], Csr]:
    """One native pass over `active` `[T, N]` bool: (tokens per group, the partial groups' Csr)."""
    active = active.contiguous()
    num_tokens, num_groups = active.shape
    counts = torch.empty(num_groups, dtype=torch.int64)
    gid, off = torch.empty(num_groups, dtype=torch.int64), torch.empty(num_groups + 1, dtype=torch.int64)
    tok = torch.empty(num_tokens * num_groups, dtype=torch.int64)
    nsel = native.library().mohd_gs_plan(num_tokens, num_groups, active.data_ptr(), num_groups, counts.data_ptr(),
                                         gid.data_ptr(), off.data_ptr(), tok.data_ptr())
    off = off[:nsel + 1]
    return counts.tolist(), Csr(gid[:nsel], off, tok[:int(off[-1])])


def csr(plan: GroupPlan) -> Csr:
    if plan.csr is not None:
        return plan.csr
    groups = plan.partial
    lengths = [plan.tokens_of[g].numel() for g in groups]
    off = torch.zeros(len(groups) + 1, dtype=torch.int64)
    off[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    tok = torch.cat([plan.tokens_of[g] for g in groups]) if groups else torch.zeros(0, dtype=torch.int64)
    return Csr(torch.tensor(groups, dtype=torch.int64), off, tok.contiguous())


def available() -> bool:
    """Whether the native library is loaded: built or loaded on the first eager call; while torch.compile
    traces, what an earlier call found (mohdify's rewrite loads it for CPU models)."""
    if torch.compiler.is_compiling():
        return native.LOADED
    return native.library() is not None


def takes(*tensors: Optional[Tensor]) -> bool:
    """Whether the native kernels take a call on these operands: the library is built, every operand is
    fp32 on CPU, matrices with unit stride along their rows (rows may be strided), vectors contiguous."""
    for t in tensors:
        if t is None:
            continue
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() not in (1, 2) or not (
                t.is_contiguous() if t.dim() == 1 else (t.stride(1) == 1 or t.shape[1] <= 1)):
            return False
    return native.library() is not None


def _ptrs(c: Csr):
    return c.gid.numel(), c.gid.data_ptr(), c.off.data_ptr(), c.tok.data_ptr()


def acc(y: Tensor, x: Tensor, wt: Tensor, c: Csr, group_size: int) -> None:
    """y `[T, C]` += x[t, group] @ wt[group rows] `[D, C]` for each partial group's tokens, in place."""
    status = native.library().mohd_gs_acc(*_ptrs(c), x.data_ptr(), x.stride(0), wt.data_ptr(), wt.stride(0),
                                          y.data_ptr(), y.stride(0), y.shape[1], group_size, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"mohdify native acc: {c.gid.numel()} partial groups, at most {MAX_GROUPS} are taken")
    calls["acc"] += 1


def dot(out: Tensor, a: Tensor, w: Tensor, bias: Optional[Tensor], c: Csr, group_size: int) -> None:
    """out[t, group] = a[t] @ w[group rows]^T (+ bias[group]) for each partial group's tokens, in place;
    a `[T, K]`, w `[D, K]`, out `[T, D]` (its other entries untouched)."""
    native.library().mohd_gs_dot(*_ptrs(c), a.data_ptr(), a.stride(0), w.data_ptr(), w.stride(0),
                                 None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0),
                                 a.shape[1], group_size, torch.get_num_threads())
    calls["dot"] += 1


def wgrad(out: Tensor, p: Tensor, q: Tensor, c: Csr, group_size: int) -> None:
    """out[group rows] = p[T_g, group]^T @ q[T_g] for each partial group (overwritten); p `[T, D]`,
    q `[T, C]`, out `[D, C]` (rows of other groups untouched)."""
    native.library().mohd_gs_wgrad(*_ptrs(c), p.data_ptr(), p.stride(0), q.data_ptr(), q.stride(0),
                                   out.data_ptr(), out.stride(0), q.shape[1], group_size, torch.get_num_threads())
    calls["wgrad"] += 1
