"""CPU kernel of `mohdify::read` / `mohdify::read_multi`: y = alpha * W[:, A] x[A] + b over active groups only.

A group's weight columns W[:, group] are one contiguous block when the weight `[O, D]` is stored
column-major (strides (1, O), the layout `layout.py` gives CPU readers at rewrite time): then
`W[:, a*G:b*G].t()` is a contiguous `[(b-a)*G, O]` matrix and one matmul per run of consecutive
active groups reads exactly the active weights. Any other layout gives the same numbers (torch's
matmul takes strided blocks), only slower at decode (codegen/README.md has the measurements).

bf16 / fp16: partial products of several runs are summed in fp32, rounded once at the end.

Decode (T <= 16 tokens) runs the native kernel (`native.py`: all weights of the call in one C call)
where it is available and takes the inputs; it checks what it relies on itself, and the full input
checks (codegen/contracts.py, with their error messages) run only when it does not take the call; the torch
loop below is its fallback.

Shape legend: T = tokens, D = in_features = N * G, O = out_features, N = groups, G = group size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..contracts import check_read, check_read_multi
from . import grouped, native
from .plan import GroupPlan, plan_groups, runs

__all__ = ["read_cpu", "read_multi_cpu"]


def _accumulate(acc: Optional[Tensor], part: Tensor) -> Tensor:
    """acc + part, in fp32 for 16-bit inputs (one rounding at the end instead of one per run)."""
    if part.dtype != torch.float32:
        part = part.float()
    return part if acc is None else acc.add_(part)


def _finish(y: Optional[Tensor], x: Tensor, out_features: int, bias: Optional[Tensor],
            alpha: Optional[Tensor]) -> Tensor:
    """alpha * y + b, cast to x's dtype; y None means no group was active (y = 0)."""
    if y is None:
        y = x.new_zeros(x.shape[0], out_features, dtype=torch.float32)        # [T, O]
    if alpha is not None:
        y = y.mul_(alpha[:, None].to(y.dtype))                                # [T, O]
    if bias is not None:
        y = y.add_(bias.to(y.dtype))                                          # [T, O]
    return y.to(x.dtype) if y.dtype != x.dtype else y


def _read_decode(x: Tensor, xm: Tensor, weight: Tensor, bias, alpha, plan: GroupPlan, group_size: int) -> Tensor:
    """Few tokens: one matmul per run of groups some token uses; xm has the other groups zeroed."""
    wt = weight.t()                                                           # [D, O], a view
    y = None
    for a, b in runs(plan.used):
        cols = slice(a * group_size, b * group_size)
        if x.shape[0] == 1 and x.dtype == torch.float32:   # GEMV: faster in fp32, slower in bf16 (measured)
            part = torch.mv(weight[:, cols], xm[0, cols])[None]               # [1, O]
        else:
            part = torch.mm(xm[:, cols], wt[cols])                            # [T, O]
        y = _accumulate(y, part)
    return _finish(y, x, weight.shape[0], bias, alpha)


def _read_grouped(x: Tensor, weight: Tensor, bias, alpha, plan: GroupPlan, group_size: int) -> Tensor:
    """Many tokens: groups all tokens use as one matmul per run, the others over their own tokens."""
    wt = weight.t()                                                           # [D, O], a view
    y = None
    for a, b in runs(plan.full):
        cols = slice(a * group_size, b * group_size)
        y = _accumulate(y, torch.mm(x[:, cols], wt[cols]))                    # [T, O]
    if y is None:
        y = x.new_zeros(x.shape[0], weight.shape[0], dtype=torch.float32)    # [T, O]
    if grouped.takes(x, wt, y):                                              # the partial groups in one native call
        grouped.acc(y, x, wt, grouped.csr(plan), group_size)
        return _finish(y, x, weight.shape[0], bias, alpha)
    for g in plan.partial:
        cols = slice(g * group_size, (g + 1) * group_size)
        idx = plan.tokens_of[g]                                               # [T_g]
        part = torch.mm(x[idx, cols], wt[cols])                               # [T_g, O]
        y.index_add_(0, idx, part.float() if part.dtype != torch.float32 else part)
    return _finish(y, x, weight.shape[0], bias, alpha)


def _masked_input(x: Tensor, mask: Tensor, plan: GroupPlan, group_size: int) -> Tensor:
    """x with each token's inactive groups zeroed; x itself when every token uses the same groups."""
    if not plan.partial:
        return x                                                              # [T, D]
    num_tokens, num_groups = mask.shape                                       # broadcast, no [T, D] mask
    return (x.reshape(num_tokens, num_groups, group_size) * mask[:, :, None].to(x.dtype)).view(x.shape)  # [T, D]


def _read_dense(xm: Tensor, weight: Tensor, bias, alpha) -> Tensor:
    """The dense-equivalent path: `read_naive`'s ops on the masked input made once per call."""
    if alpha is None:
        return F.linear(xm, weight, bias)                                     # [T, O]
    y = F.linear(xm, weight) * alpha[:, None].to(xm.dtype)                    # [T, O]
    return y if bias is None else y + bias                                    # [T, O]


def _read_one(x: Tensor, xm: Optional[Tensor], weight: Tensor, bias, mask: Tensor, alpha,
              plan: GroupPlan, group_size: int) -> Tensor:
    if plan.path == "dense":
        return _read_dense(xm, weight, bias, alpha)                           # [T, O]
    if plan.path == "decode":
        return _read_decode(x, xm, weight, bias, alpha, plan, group_size)
    return _read_grouped(x, weight, bias, alpha, plan, group_size)


def read_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, alpha: Optional[Tensor]) -> Tensor:
    """CPU kernel of `mohdify::read`, `[T, D]` -> `[T, O]`; equals `read_naive` (see module docstring)."""
    if (ys := native.read(x, [weight], [bias], mask, alpha)) is not None:
        return ys[0]                                                          # [T, O], one native call
    group_size = check_read("mohdify::read", x, weight, bias, mask, alpha)
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[0])
    plan = plan_groups(mask, x.dtype, "read", group_size, grouped.takes(x, weight.t()))
    xm = _masked_input(x, mask, plan, group_size) if plan.path != "grouped" else None
    return _read_one(x, xm, weight, bias, mask, alpha, plan, group_size)


def read_multi_cpu(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], mask: Tensor,
                   alpha: Optional[Tensor]) -> list[Tensor]:
    """CPU kernel of `mohdify::read_multi`: `read_cpu` per weight, with the routing read once.
    Each output equals the separate `read_cpu` bit for bit (same plan, same ops)."""
    if (ys := native.read(x, weights, biases, mask, alpha)) is not None:
        return ys                                                             # one native call for all weights
    group_size = check_read_multi("mohdify::read_multi", x, weights, biases, mask, alpha)
    if x.shape[0] == 0:
        return [x.new_zeros(0, w.shape[0]) for w in weights]
    plan = plan_groups(mask, x.dtype, "read", group_size, grouped.takes(x, *(w.t() for w in weights)))
    xm = _masked_input(x, mask, plan, group_size) if plan.path != "grouped" else None
    return [_read_one(x, xm, w, b, mask, alpha, plan, group_size) for w, b in zip(weights, biases)]
