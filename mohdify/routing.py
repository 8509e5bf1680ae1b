"""Routing: the one value a MoHD branch application computes and its readers and writer consume.

`route_tokens` is the branch math of MOHD_SPEC.md (scores, top-k, gates, activation scale, balance
loss), written once: `MoHDBranch.route` calls it in eager mode and under torch.export, and the
torch.compile backend's graph rewrite (passes/rewrite.py) inserts calls of it into dense graphs.

How routing reaches the writer in eager mode: the first reader of a branch application computes
the `Routing` and leaves it in a per-thread slot keyed by the branch (`RoutingSlots`); the other
readers of the same input reuse it; the writer takes it out of the slot. Nothing is left on a
module: two threads calling one model each have their own slots, and after a forward the slots
are empty.

Shape legend: T = tokens, D = hidden size, N = groups, G = D / N, N_s / N_r = shared / routed
groups, k = top_k.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from mohdify.codegen import route as route_op
from mohdify.codegen import route_naive
from mohdify.codegen.contracts import transformed
from mohdify.codegen.cpu import routing as native_routing

from .routers import router_kind

__all__ = ["Routing", "route_tokens", "activation_scale", "balance_loss", "RoutingSlots"]


class Routing(NamedTuple):
    """The routing of one branch application over T tokens."""

    mask: Tensor               # [T, N] bool, the active groups (shared and chosen)
    scale: Optional[Tensor]    # [T] reader input scale alpha, None for scaling "none"
    gates: Tensor              # [T, N] writer gates in x's dtype, 0 for inactive groups
    balance: Optional[Tensor]  # [] the balance loss N_r sum_i f_i P_i, when asked for


def activation_scale(x: Tensor, mask: Tensor, scaling: str, density: float, group_size: int) -> Optional[Tensor]:
    """Activation scaling alpha `[T]` of the readers' input `x` `[T, D]`, or None for scaling "none"."""
    if scaling == "none":
        return None
    if scaling == "density":
        return x.new_full((x.shape[0],), 1.0 / density)                       # [T]
    kept = x.view(x.shape[0], mask.shape[1], group_size) * mask[:, :, None].to(x.dtype)  # [T, N, G]
    full = x.norm(dim=-1)                                                     # [T]
    part = kept.flatten(1).norm(dim=-1)                                       # [T]
    return torch.where(part > 0, full / part.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(full))


def balance_loss(probs: Tensor, topk: Tensor) -> Tensor:
    """N_r * sum_i f_i P_i: f_i = share of tokens routed to i, P_i = mean probability of i."""
    return _balance(probs, _routed_share(probs, topk))


def _routed_share(probs: Tensor, topk: Tensor) -> Tensor:
    """f_i `[N_r]`: the share of the tokens whose top-k `[T, k]` holds routed column i."""
    return torch.zeros_like(probs).scatter(1, topk, 1.0).mean(0)


def _balance(probs: Tensor, share: Tensor) -> Tensor:
    if probs.shape[0] == 0:
        return probs.sum() * 0.0                                              # no tokens: no imbalance
    return probs.shape[1] * (share * probs.mean(0)).sum()


def route_tokens(x: Tensor, kind: str, router: Optional[Tensor], shared_idx: Tensor, routed_idx: Tensor,
                 top_k: int, scaling: str, density: float, balance: bool = False) -> Routing:
    """Route the branch input `x` `[T, D]`.

    Args:
        kind: the router kind's name (`mohdify.routers.ROUTER_KINDS`); the kind scores the tokens.
        router: the kind's weight (`[N_r, D]` for "learned"), or None for a parameter-free kind.
        shared_idx / routed_idx: `[N_s]` / `[N_r]` group ids.
        balance: compute the balance loss (kinds with probabilities). When autograd is off (the
            no-grad forward of reentrant checkpointing), the probabilities are recomputed with
            autograd on, so the loss still reaches the router.
    """
    scores_of = router_kind(kind).scores
    group_size = x.shape[1] // (shared_idx.shape[0] + routed_idx.shape[0])   # G
    scores, probs = scores_of(x, router, group_size, routed_idx)             # [T, N_r], [T, N_r] or None
    counts, topk = None, None                                                # [N_r] tokens per routed group, [T, k]
    if probs is not None and scores is probs and native_routing.takes(probs, top_k):
        # many tokens on CPU: top-k, gates and counts in one native pass (codegen/cpu/routing.py)
        mask, gates, counts, _ = native_routing.route_gates(probs, shared_idx, routed_idx, top_k)
        gates = gates.to(x.dtype)                                            # [T, N]
    else:
        # inside a torch.func transform the reference (vmap has no batching rule for the op: it would
        # loop over the batch, warning at every call)
        route_fn = route_naive if transformed(scores) else route_op
        mask, topk = route_fn(scores.detach(), shared_idx, routed_idx, top_k)    # [T, N], [T, k]
        gates = mask.to(x.dtype)                                             # [T, N]
        if probs is not None:
            chosen = probs.gather(1, topk)                                   # [T, k]
            g = top_k * chosen / chosen.sum(-1, keepdim=True)                # [T, k]
            gates = gates.scatter(1, routed_idx[topk], g.to(x.dtype))        # [T, N]
    loss = None
    if probs is not None and balance:
        share = _routed_share(probs, topk) if counts is None else counts / probs.shape[0]   # [N_r] f_i
        if not probs.requires_grad and router is not None and router.requires_grad:
            with torch.enable_grad():
                _, probs = scores_of(x.detach(), router, group_size, routed_idx)   # [T, N_r]
                loss = _balance(probs, share)
        else:
            loss = _balance(probs, share)
    return Routing(mask, activation_scale(x, mask, scaling, density, group_size), gates, loss)


class RoutingSlots(threading.local):
    """Per-thread hand-off of a branch application's routing from its readers to its writer.

    `slots[id(branch)] = (source, x2, routing, xm)`: `source` is the reader input the routing was
    computed from (readers given the same tensor reuse it), `x2` its `[T, D]` view, `xm` the masked
    input of the eager masked path (codegen/cpu/masked.py) or None.
    """

    def __init__(self):
        self.slots: dict[int, tuple[Tensor, Tensor, Routing, Optional[Tensor]]] = {}


SLOTS = RoutingSlots()
