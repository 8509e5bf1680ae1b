"""Native routing of many tokens for routers with probabilities (routing.c): `mohdify::route_gates`.

`mohdify.routing.route_tokens` turns a learned router's probabilities into the mask, the gates and
the balance loss's routed shares with a top-k (the `mohdify::route` op, a sort), a gather, a sum and
two scatters. At training sizes those small ops cost more than they compute: under torch.compile,
inductor's code for them ran ~1.3 ms forward per branch application at T 2064, N_r 12 (per-token
loops of width k, mask bytes stored one by one), eagerly ~0.6 ms of sort, fills and scatters. One
native pass does the same (same selection order, ties and NaN), and a second one the probabilities'
gradient. The op is opaque to torch.compile (a custom op), so the compiled graph calls it too.

`takes(probs, ...)` decides: CPU, fp32, more tokens than a decode call (decode keeps the graph's own
routing code, whose per-call cost is lower there), not exporting (an exported graph keeps
`mohdify::route`), not inside a torch.func transform, the library loaded, N_r <= 1024.

Shape legend: T = tokens, N = groups, N_s / N_r = shared / routed groups, k = top_k.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from ..contracts import transformed
from . import native
from .plan import DECODE_MAX_TOKENS

__all__ = ["takes", "route_gates", "calls", "MAX_ROUTED"]

MAX_ROUTED = 1024          # routing.c
calls: Counter = Counter()  # "route_gates" / "route_gates_backward": native calls made


def takes(probs: Tensor, top_k: int) -> bool:
    """Whether `route_gates` takes these probabilities `[T, N_r]` (see the module docstring)."""
    if probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 2:
        return False
    if probs.shape[0] <= DECODE_MAX_TOKENS or not 0 < top_k <= probs.shape[1] <= MAX_ROUTED:
        return False
    if torch.compiler.is_exporting() or transformed(probs):
        return False
    if torch.compiler.is_compiling():
        return native.LOADED
    return native.library() is not None


def _check(status: int, op: str, num_routed: int, top_k: int) -> None:
    """routing.c returns 1 for a routed-group count or top_k out of range."""
    if status != 0:
        raise ValueError(f"mohdify::{op}: {num_routed} routed groups and top_k {top_k}: required "
                         f"1 <= top_k <= routed groups <= {MAX_ROUTED}")


@torch.library.custom_op("mohdify::route_gates", mutates_args=())
def route_gates(probs: Tensor, shared_idx: Tensor, routed_idx: Tensor, top_k: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`[T, N_r]` fp32 probabilities -> (mask `[T, N]` bool, gates `[T, N]` fp32 (k p / S for the chosen,
    1 for shared, 0 else), counts `[N_r]` fp32 (tokens per routed column), sums `[T]` (S, for the backward))."""
    probs = probs.contiguous()
    shared_idx, routed_idx = shared_idx.contiguous(), routed_idx.contiguous()
    num_tokens, num_routed = probs.shape
    num_groups = shared_idx.numel() + num_routed
    mask = torch.empty(num_tokens, num_groups, dtype=torch.bool)
    gates = torch.empty(num_tokens, num_groups, dtype=torch.float32)
    counts = torch.empty(num_routed, dtype=torch.float32)
    sums = torch.empty(num_tokens, dtype=torch.float32)
    status = native.library().mohd_route_gates(num_tokens, num_routed, shared_idx.numel(), top_k, probs.data_ptr(),
                                               shared_idx.data_ptr(), routed_idx.data_ptr(), mask.data_ptr(),
                                               gates.data_ptr(), counts.data_ptr(), sums.data_ptr())
    _check(status, "route_gates", num_routed, top_k)
    calls["route_gates"] += 1
    return mask, gates, counts, sums


@route_gates.register_fake
def _route_gates_fake(probs, shared_idx, routed_idx, top_k):
    num_tokens, num_routed = probs.shape
    num_groups = shared_idx.shape[0] + num_routed
    return (probs.new_empty(num_tokens, num_groups, dtype=torch.bool), probs.new_empty(num_tokens, num_groups),
            probs.new_empty(num_routed), probs.new_empty(num_tokens))


@torch.library.custom_op("mohdify::route_gates_backward", mutates_args=())
def route_gates_backward(mask: Tensor, gates: Tensor, sums: Tensor, grad_gates: Tensor, routed_idx: Tensor,
                         top_k: int) -> Tensor:
    """The probabilities' gradient `[T, N_r]` from the gates' gradient `[T, N]` (routing.c)."""
    grad_gates = grad_gates.to(torch.float32).contiguous()
    num_tokens, num_routed = mask.shape[0], routed_idx.numel()
    grad_probs = torch.empty(num_tokens, num_routed, dtype=torch.float32)
    status = native.library().mohd_route_gates_bw(num_tokens, num_routed, mask.shape[1] - num_routed, top_k,
                                                  mask.data_ptr(), gates.data_ptr(), sums.data_ptr(),
                                                  grad_gates.data_ptr(), routed_idx.contiguous().data_ptr(),
                                                  grad_probs.data_ptr())
    _check(status, "route_gates_backward", num_routed, top_k)
    calls["route_gates_backward"] += 1
    return grad_probs


@route_gates_backward.register_fake
def _route_gates_backward_fake(mask, gates, sums, grad_gates, routed_idx, top_k):
    return gates.new_empty(mask.shape[0], routed_idx.shape[0])


def _setup(ctx, inputs, output):
    _, _, routed_idx, top_k = inputs
    mask, gates, counts, sums = output
    ctx.save_for_backward(mask, gates, sums, routed_idx)
    ctx.top_k = top_k
    ctx.mark_non_differentiable(mask, counts, sums)


def _backward(ctx, grad_mask, grad_gates, grad_counts, grad_sums):
    if grad_gates is None:
        return None, None, None, None
    mask, gates, sums, routed_idx = ctx.saved_tensors
    return route_gates_backward(mask, gates, sums, grad_gates, routed_idx, ctx.top_k), None, None, None


route_gates.register_autograd(_backward, setup_context=_setup)
