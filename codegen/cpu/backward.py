"""CPU kernels of `mohdify::read_backward` and `mohdify::write_backward`: gradients over active groups only.

Two paths, chosen per call by `plan_groups` (the crossover table of crossover.py):
  - "grouped": groups every token uses run as one matmul over all tokens; every other group over
    its own tokens (gathered once, used for both its input gradient and its weight gradient). A
    group no token uses is never read: its weight gradient is zero, by the math.
  - "dense": the dense-equivalent: the matmuls of a dense layer's backward (two), with the masks
    applied element-wise. Unlike the reference it does not run the forward matmul again for the
    reader's alpha gradient (sum over active dims of x * (g W), the product grad_x needs anyway),
    and the writer's z = W u + b only when the gates or the fusion need a gradient, read from the
    forward's output (z = out / gates) when there is no fusion.

Gate gradients (writer): the gradient of a gate that is 0 is 0 here (the reference gives
<grad_o, W u + b> there). A zero gate is an inactive group: the kernels never compute its output,
forward or backward, so its weights are never read; and MoHD's routing never differentiates
through a zero gate (its gates are the top-k gates scattered into constants), so router, gate and
every other gradient equal the reference's. Active gates' gradients equal the reference's.

Weight gradients come back in the weight's layout (column-major readers: `[D, O]` storage), so
autograd accumulates them without a copy. `PATHS` counts the path each call took (tests assert it).

Shape legend: T = tokens, D = N * G, O = reader out_features, I = writer in_features, N = groups.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import Tensor

from ..contracts import check_read_backward, check_write_backward
from . import grouped
from .layout import is_column_major
from .plan import GroupPlan, plan_groups, runs

__all__ = ["read_backward_cpu", "write_backward_cpu", "PATHS"]

PATHS: Counter = Counter()   # "read_backward:grouped" -> calls; read by tests and benchmarks


def _plan(active: Tensor, dtype: torch.dtype, kind: str, group_size: int, native: bool) -> GroupPlan:
    plan = plan_groups(active, dtype, kind, group_size, native)
    if plan.path == "decode":   # few tokens: the grouped loops with every partial group's tokens
        tokens_of = {g: active[:, g].nonzero().squeeze(1) for g in plan.partial}
        plan = GroupPlan("grouped", plan.full, plan.partial, tokens_of)
    PATHS[f"{kind}:{plan.path}"] += 1
    return plan


def _like_weight(grad_wt: Tensor, weight: Tensor) -> Tensor:
    """`[in, out]` storage -> the `[out, in]` gradient in the weight's own layout."""
    return grad_wt.t() if is_column_major(weight) else grad_wt.t().contiguous()


def _unused_rows_zero(buf: Tensor, plan: GroupPlan, num_groups: int, group_size: int) -> None:
    used = set(plan.used)
    for g in range(num_groups):
        if g not in used:
            buf[g * group_size:(g + 1) * group_size].zero_()


# ---- reader: y = alpha * W[:, A] x[A] + b ------------------------------------------------------

def _read_grads_grouped(grad: Tensor, x: Tensor, xa: Tensor, weight: Tensor, plan: GroupPlan,
                        group_size: int) -> tuple[Tensor, Tensor]:
    """(p, grad_w^T): p = (grad W) at active (token, group) pairs, 0 elsewhere `[T, D]`;
    grad_w^T = xa[active]^T grad `[D, O]` (xa = alpha * x)."""
    num_tokens, dim = x.shape
    p = x.new_zeros(num_tokens, dim)                                          # [T, D]
    gwt = x.new_empty(dim, weight.shape[0])                                   # [D, O]
    for a, b in runs(plan.full):
        cols = slice(a * group_size, b * group_size)
        p[:, cols] = grad @ weight[:, cols]                                   # [T, (b-a)G]
        torch.mm(xa[:, cols].t(), grad, out=gwt[cols])                        # [(b-a)G, O]
    wt = weight.t()                                                           # [D, O]
    if grouped.takes(grad, xa, wt, p, gwt):                                   # partial groups: native, in place
        c = grouped.csr(plan)
        grouped.dot(p, grad, wt, None, c, group_size)                         # p[t, g] = grad[t] W[:, g]
        grouped.wgrad(gwt, xa, grad, c, group_size)                           # gwt[g] = xa[T_g, g]^T grad[T_g]
        _unused_rows_zero(gwt, plan, x.shape[1] // group_size, group_size)
        return p, gwt
    for g in plan.partial:
        cols = slice(g * group_size, (g + 1) * group_size)
        idx = plan.tokens_of[g]                                               # [T_g]
        gi = grad.index_select(0, idx)                                        # [T_g, O]
        p[idx, cols] = gi @ weight[:, cols]                                   # [T_g, G]
        torch.mm(xa.index_select(0, idx)[:, cols].t(), gi, out=gwt[cols])     # [G, O]
    _unused_rows_zero(gwt, plan, x.shape[1] // group_size, group_size)
    return p, gwt


def _masked(t: Tensor, mask: Optional[Tensor]) -> Tensor:
    """`t` `[T, D]` with each token's inactive groups zeroed (broadcast over G, no `[T, D]` mask)."""
    if mask is None:
        return t
    num_tokens, num_groups = mask.shape
    return (t.reshape(num_tokens, num_groups, -1) * mask[:, :, None].to(t.dtype)).view(t.shape)  # [T, D]


def _read_grads_dense(grad: Tensor, xa: Tensor, weight: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The same (p, grad_w^T) with two dense matmuls; xa already masked."""
    return _masked(grad @ weight, mask), xa.t() @ grad                       # [T, D], [D, O]


def read_backward_cpu(grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, mask: Tensor,
                      alpha: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of the reader w.r.t. (x, weight, bias, alpha), as `read_backward_naive`."""
    group_size = check_read_backward("mohdify::read_backward", grad, x, weight, mask, alpha)
    grad = grad.contiguous()
    if x.shape[0] == 0:
        PATHS["read_backward:empty"] += 1
        return (x.new_zeros(x.shape), torch.zeros_like(weight), grad.sum(0) if has_bias else None,
                alpha.new_zeros(0) if alpha is not None else None)
    plan = _plan(mask, x.dtype, "read_backward", group_size, grouped.takes(grad, x, weight.t()))
    if plan.path == "grouped":
        xa = x if alpha is None else x * alpha[:, None].to(x.dtype)           # [T, D]
        p, gwt = _read_grads_grouped(grad, x, xa, weight, plan, group_size)
    else:
        m = mask if plan.partial else None                                   # [T, N]
        xm = _masked(x, m)                                                    # [T, D]
        xa = xm if alpha is None else xm * alpha[:, None].to(x.dtype)         # [T, D]
        p, gwt = _read_grads_dense(grad, xa, weight, m)
    grad_alpha = None
    if alpha is not None:
        grad_alpha = (p.float() * x.float()).sum(-1).to(alpha.dtype)         # [T]: p is 0 off the active dims
        p.mul_(alpha[:, None].to(p.dtype))                                    # [T, D]
    return p, _like_weight(gwt, weight), grad.sum(0) if has_bias else None, grad_alpha


# ---- writer: o = M (gates * (W u + b)) -----------------------------------------------------------

def _write_grads(gz: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], plan: GroupPlan,
                 group_size: int, need_z: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(grad_u, grad_w, z): grad_z = gz `[T, D]` (0 off active pairs); z = W u + b (grouped: at active
    pairs only, 0 elsewhere; dense: everywhere) when need_z, else None."""
    num_tokens, dim = gz.shape
    z = u.new_zeros(num_tokens, dim) if need_z else None                      # [T, D]
    if plan.path != "grouped":
        z = torch.nn.functional.linear(u, weight, bias) if need_z else None   # [T, D] (every group)
        return gz @ weight, gz.t() @ u, z                                     # [T, I], [D, I]
    grad_u = None
    gw = u.new_empty(dim, u.shape[1])                                         # [D, I]
    for a, b in runs(plan.full):
        rows = slice(a * group_size, b * group_size)
        part = gz[:, rows] @ weight[rows]                                     # [T, I]
        grad_u = part if grad_u is None else grad_u.add_(part)
        torch.mm(gz[:, rows].t(), u, out=gw[rows])                            # [(b-a)G, I]
        if need_z:
            z[:, rows] = _affine(u, weight[rows], None if bias is None else bias[rows])
    if grad_u is None:
        grad_u = u.new_zeros(u.shape)                                         # [T, I]
    if grouped.takes(gz, u, weight, bias, grad_u, gw, z):                     # partial groups: native, in place
        c = grouped.csr(plan)
        grouped.acc(grad_u, gz, weight, c, group_size)                        # grad_u[t] += gz[t, g] W[g]
        grouped.wgrad(gw, gz, u, c, group_size)                               # gw[g] = gz[T_g, g]^T u[T_g]
        if need_z:
            grouped.dot(z, u, weight, bias, c, group_size)                    # z[t, g] = W[g] u[t] + b[g]
        _unused_rows_zero(gw, plan, dim // group_size, group_size)
        return grad_u, gw, z
    for g in plan.partial:
        rows = slice(g * group_size, (g + 1) * group_size)
        idx = plan.tokens_of[g]                                               # [T_g]
        ui = u.index_select(0, idx)                                           # [T_g, I]
        gzi = gz.index_select(0, idx)[:, rows]                                # [T_g, G]
        grad_u.index_add_(0, idx, gzi @ weight[rows])                         # [T_g, I]
        torch.mm(gzi.t(), ui, out=gw[rows])                                   # [G, I]
        if need_z:
            z[idx, rows] = _affine(ui, weight[rows], None if bias is None else bias[rows])
    _unused_rows_zero(gw, plan, dim // group_size, group_size)
    return grad_u, gw, z


def _affine(u: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return u @ w.t() if b is None else torch.addmm(b, u, w.t())               # [T', rows]


def write_backward_cpu(grad: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                       fusion: Optional[Tensor], need_gates: bool = True, out: Optional[Tensor] = None):
    """Gradients of the writer w.r.t. (u, weight, bias, gates, fusion), as `write_backward_naive`
    except that zero gates get a zero gradient (module docstring); `need_gates` False skips them
    (returns zeros) when the gates need no gradient. `out` (the forward's output, fusion None):
    z = out / gates at active groups, instead of the matmul W u + b."""
    group_size = check_write_backward("mohdify::write_backward", grad, u, weight, bias, gates, fusion)
    num_tokens, num_groups = gates.shape
    grad3 = grad.contiguous().view(num_tokens, num_groups, group_size)        # [T, N, G]
    go3 = grad3 if fusion is None else torch.einsum("ij,tig->tjg", fusion.to(grad.dtype), grad3)  # [T, N, G]
    gz = (go3 * gates[:, :, None].to(grad.dtype)).reshape(grad.shape)       # [T, D]
    if num_tokens == 0:
        PATHS["write_backward:empty"] += 1
        grad_fusion = fusion.new_zeros(fusion.shape) if fusion is not None else None
        return (u.new_zeros(u.shape), weight.new_zeros(weight.shape), gz.sum(0) if bias is not None else None,
                gates.new_zeros(gates.shape), grad_fusion)
    active = gates != 0                                                       # [T, N]
    plan = _plan(active, u.dtype, "write_backward", group_size, grouped.takes(grad, u, weight, bias))
    from_out = out is not None and fusion is None and need_gates
    need_z = (need_gates or fusion is not None) and not from_out
    grad_u, gw, z = _write_grads(gz, u, weight, bias, plan, group_size, need_z)
    grad_gates = gates.new_zeros(gates.shape)                                 # [T, N]
    grad_fusion = None
    if from_out:   # <grad_o, z> = <grad_o, out> / gate at active groups: no matmul
        dot = (go3 * out.reshape(num_tokens, num_groups, group_size)).sum(-1)  # [T, N]
        grad_gates = torch.where(active, dot / torch.where(active, gates, 1).to(dot.dtype), 0).to(gates.dtype)
    elif z is not None:
        z3 = z.view(num_tokens, num_groups, group_size)                       # [T, N, G]
        if need_gates:
            dot = (go3 * z3).sum(-1)                                          # [T, N]
            grad_gates = torch.where(active, dot, 0).to(gates.dtype)          # [T, N], 0 at zero gates
        if fusion is not None:
            zg = z3 * gates[:, :, None].to(z.dtype)                           # [T, N, G]
            grad_fusion = torch.einsum("tig,tjg->ij", grad3, zg).to(fusion.dtype)  # [N, N]
    grad_b = gz.sum(0) if bias is not None else None                          # [D]
    return grad_u, gw, grad_b, grad_gates, grad_fusion
