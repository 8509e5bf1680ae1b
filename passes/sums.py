"""Residual sums and stream terms: a chain of adds read as one sum, and a term followed back to the
stream it carries (through copies, casts, shape-only ops and scales). The vocabulary of the
analysis (analyze.py) and of its report of terms no writer produced (unwritten.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from torch import fx

from .graphview import GraphView, canonical, is_add, is_alias, is_div, is_mul, is_shape_only, last_dim, numel

__all__ = ["through_copies", "sum_root", "sum_terms", "stream_parent", "stream_source", "stream_chain"]


def through_copies(view: GraphView, n: fx.Node) -> Optional[fx.Node]:
    """The only user of `n`, looking through single-use copies and casts of the same size
    (`h.clone().add_(f)` in an exported graph is clone, then add); None if `n` has several users."""
    users = view.users(n)
    while len(users) == 1 and is_alias(users[0]) and numel(users[0]) == numel(n) and len(view.users(users[0])) == 1:
        users = view.users(users[0])
    return users[0] if len(users) == 1 else None


def sum_root(view: GraphView, n: fx.Node) -> fx.Node:
    """The last add of the chain of adds `n` is part of (an add whose only user is an add of its size)."""
    while True:
        user = through_copies(view, n)
        if user is None or not is_add(user) or numel(user) != numel(n):
            return n
        n = user


def sum_terms(view: GraphView, root: fx.Node) -> list[fx.Node]:
    """The terms of the residual sum ending at `root`, inner adds of the chain flattened."""
    out, todo = [], [root]
    while todo:
        n = todo.pop()
        inner = n
        while inner is not root and is_alias(inner) and len(view.users(inner)) == 1 and \
                isinstance(view.arg(inner, 0), fx.Node) and numel(view.arg(inner, 0)) == numel(inner):
            inner = view.arg(inner, 0)   # a single-use copy of an inner add
        single = through_copies(view, inner) is not None and numel(inner) == numel(root)
        if is_add(inner) and (inner is root or single):
            todo.extend(reversed(view.add_operands(inner)))
        else:
            out.append(n)
    return out


def stream_parent(view: GraphView, n: fx.Node) -> Optional[fx.Node]:
    """The node whose value `n` carries unchanged or scaled: through casts, copies, shape-only ops
    and a product with a scalar or a vector (DeepNorm's alpha * h); None if `n` is no such op."""
    if is_alias(n) or is_shape_only(n):
        src = view.arg(n, 0)
        return src if isinstance(src, fx.Node) and numel(src) == numel(n) else None
    if is_mul(n) or is_div(n):
        a, b = view.arg(n, 0), view.arg(n, 1)
        candidates = [a, b] if is_mul(n) else [a]
        for x, other in zip(candidates, [b, a]):
            if not isinstance(x, fx.Node) or numel(x) != numel(n):
                continue
            if not isinstance(other, fx.Node) or (numel(other) or 0) <= (last_dim(n) or 0) or last_dim(other) == 1:
                return x   # times a scalar, a vector or a per-token [.., 1] scale
    return None


def stream_source(view: GraphView, term: fx.Node, accept: Callable[[fx.Node], bool], limit: int = 8):
    """The first node from `term` back through `stream_parent` that `accept`s, or None."""
    node = term
    for _ in range(limit):
        if node is None:
            return None
        if accept(node):
            return node
        node = stream_parent(view, node)
    return None


def stream_chain(view: GraphView, h: fx.Node, limit: int = 8) -> set:
    """h and the nodes it carries the value of (through copies, casts and scales; their canonical forms)."""
    out, node = set(), h
    for _ in range(limit):
        if node is None:
            break
        out |= {node, canonical(node)}
        node = stream_parent(view, node)
    return out
