"""Fuse: a mohdified model's dynamo graph -> one routing, one reader launch and one writer+add per branch.

Used by `torch.compile(model, backend="mohd")` (mohdify/backend.py) on graphs that call the MoHD
ops, before the graph goes to the compiler (inductor, aot_eager or eager).

IR level: the torch-level FX graph dynamo hands a backend, before AOT autograd (torch functions,
tensor methods and `torch.ops.mohdify.*` calls; parameters are placeholders; `example_value`
meta holds fake tensors). Autograd is traced afterwards, so the fused ops carry their own
registered backward.

Two sub-passes, in this order (routing needs none: a mohdified model computes it once per branch
application, mohdify/routing.py, so every reader of a branch input takes the same x2, mask and
alpha nodes):
1. Read merge. Pattern: >= 2 calls `mohdify::read(x, W_i, b_i, mask, alpha)` with the same x, mask
   and alpha nodes (the readers of a branch input), all with a bias or all without one.
   Replaced by `ys = mohdify::read_multi(x, [W_i], [b_i], mask, alpha)` at the first read and
   `ys[i]` for read i. Preconditions: no in-place op between the first and the last read; every
   W_i / b_i is computed before the first read (a pure op on earlier nodes, e.g. a Conv1D
   `weight.t()`, is moved up; otherwise the group is left alone).
2. Write + residual add. Pattern: `o = mohdify::write(u, W, b, gates, M)`, then only shape ops
   (view, reshape, contiguous, unflatten_tokens) and identity dropouts (training=False or p=0),
   each the only user of the one before, into `r = add(h, o')` or `add(o', h)` (no alpha) with
   h, o' and r of the same shape and dtype and h.shape[-1] = D. Replaced by
   `mohdify::write_add(u, W, b, gates, M, h.reshape(-1, D))` viewed to h's shape, at the add.
   Precondition: no in-place op between the write and the add.

Afterwards: the graph lints and computes the same forward numbers bit for bit on the reference
(CPU) path: every merged node computed the same function of the same inputs, read_multi's
reference is the per-weight read and write_add's is write + residual. Gradients are equal up to
fp32 summation order. New nodes carry example values and the module stack of the node they replace.
"""

from __future__ import annotations

import inspect
import operator
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx
from torch._ops import HigherOrderOperator, OpOverload
from torch.fx.experimental.symbolic_shapes import statically_known_true

import mohdify.codegen  # noqa: F401 - registers torch.ops.mohdify.*

from .graph_names import node_value
from .rewrite import GraphBuilder, graph_fake_mode, unflatten_tokens
from .targets import (
    PLAIN_ADD_METHODS,
    PLAIN_ADD_TARGETS,
    RESHAPE_METHODS,
    mohd_op_kind,
    mohd_op_nodes,
    mutates,
    target_name,
)

__all__ = ["FuseReport", "fuse_graph"]

_RANDOM_OR_UNINIT = re.compile(r"rand|dropout|bernoulli|multinomial|normal|uniform|poisson|exponential|cauchy|"
                               r"geometric|empty")


@dataclass
class FuseReport:
    """What `fuse_graph` did to one graph."""

    reads_merged: int = 0           # mohdify::read calls replaced by read_multi outputs
    read_multi: int = 0             # read_multi calls inserted
    writes_fused: int = 0           # write + add pairs replaced by write_add
    not_fused: list[tuple[str, str]] = field(default_factory=list)   # (node, why it was left alone)


def _mergeable(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or mutates(node):
        return False
    if _RANDOM_OR_UNINIT.search(target_name(node)):
        return False
    if node.op == "call_function":
        if isinstance(node.target, HigherOrderOperator) or node.is_impure():
            return False
        if isinstance(node.target, OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            return False
    return True


def _mutation_between(order: dict, mutations: list[fx.Node], a: fx.Node, b: fx.Node) -> Optional[fx.Node]:
    return next((m for m in mutations if order[a] < order[m] < order[b]), None)


def _hoist(args: list, first: fx.Node, order: dict) -> bool:
    """Make every node in `args` run before `first`, moving pure ops whose inputs already do."""
    for a in args:
        if not isinstance(a, fx.Node) or order[a] < order[first]:
            continue
        if not _mergeable(a) or any(order[i] >= order[first] for i in a.all_input_nodes):
            return False
        first.prepend(a)
        order[a] = order[first] - 0.5
    return True


def _merge_reads(graph: fx.Graph, b: GraphBuilder, report: FuseReport) -> None:
    groups: dict[tuple, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_function" and mohd_op_kind(n.target) == "read" and len(n.args) == 5 and not n.kwargs:
            x, _, bias, mask, alpha = n.args
            groups.setdefault((x, mask, alpha, bias is None), []).append(n)
    mutations = [n for n in graph.nodes if mutates(n)]
    for reads in groups.values():
        if len(reads) < 2:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        first, last = reads[0], reads[-1]
        blocker = _mutation_between(order, mutations, first, last)
        if blocker is not None:
            report.not_fused.append((first.name, f"in-place op {blocker.name} runs between its reads"))
            continue
        weights, biases = [r.args[1] for r in reads], [r.args[2] for r in reads]
        if not _hoist(weights + biases, first, order):
            report.not_fused.append((first.name, "a weight or bias of its group is computed after the first read"))
            continue
        x, _, _, mask, alpha = first.args
        with graph.inserting_before(first):
            multi = b.node("call_function", torch.ops.mohdify.read_multi.default,
                           (x, weights, biases, mask, alpha), first)
            outs = [b.node("call_function", operator.getitem, (multi, i), r) for i, r in enumerate(reads)]
        for r, y in zip(reads, outs):
            r.replace_all_uses_with(y)
            graph.erase_node(r)
        report.reads_merged += len(reads)
        report.read_multi += 1


def _identity_dropout(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not F.dropout:
        return False
    try:
        bound = inspect.signature(F.dropout).bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    bound.apply_defaults()
    p, training, inplace = bound.arguments["p"], bound.arguments["training"], bound.arguments["inplace"]
    return inplace is False and (training is False or (isinstance(p, (int, float)) and p == 0))


def _passes_values_through(node: fx.Node, src: fx.Node) -> bool:
    """A shape op or identity dropout of `src` (the values of `src`, row-major, in another shape)."""
    if not node.args or node.args[0] is not src:
        return False
    if node.op == "call_function" and node.target in (torch.reshape, unflatten_tokens):
        return True   # unflatten_tokens' second argument gives only the leading dims
    others = [a for a in node.all_input_nodes if a is not src and isinstance(node_value(a), torch.Tensor)]
    if others:
        return False
    if node.op == "call_method":
        return node.target in RESHAPE_METHODS
    return _identity_dropout(node)


def _is_plain_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in PLAIN_ADD_TARGETS)
            or (node.op == "call_method" and node.target in PLAIN_ADD_METHODS)) \
        and len(node.args) == 2 and not node.kwargs


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _residual_add(w: fx.Node) -> Optional[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """(add, h, chain) when the write's value reaches only `add(h, .)` through value-preserving ops."""
    chain, cur = [w], w
    while len(cur.users) == 1:
        (user,) = cur.users
        if not _passes_values_through(user, cur):
            break
        chain.append(user)
        cur = user
    if len(cur.users) != 1:
        return None
    (add,) = cur.users
    if not _is_plain_add(add) or add.args.count(cur) != 1:
        return None
    h = add.args[1] if add.args[0] is cur else add.args[0]
    vals = [node_value(n) if isinstance(n, fx.Node) else None for n in (h, cur, add)]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    hv, ov, rv = vals
    dim = node_value(w).shape[-1]
    if not (_same_shape(hv, ov) and _same_shape(hv, rv) and hv.dtype == ov.dtype == rv.dtype
            and statically_known_true(hv.shape[-1] == dim)):
        return None
    return add, h, chain


def _fuse_writes(graph: fx.Graph, b: GraphBuilder, report: FuseReport) -> None:
    mutations = [n for n in graph.nodes if mutates(n)]
    for w in mohd_op_nodes(graph, ("write",)):
        found = _residual_add(w) if len(w.args) == 5 and not w.kwargs else None
        if found is None:
            continue
        add, h, chain = found
        order = {n: i for i, n in enumerate(graph.nodes)}
        blocker = _mutation_between(order, mutations, w, add)
        if blocker is not None:
            report.not_fused.append((w.name, f"in-place op {blocker.name} runs between the write and its add"))
            continue
        dim = node_value(w).shape[-1]
        with graph.inserting_before(add):
            h2 = b.node("call_method", "reshape", (h, -1, dim), add)                     # [T, D]
            o2 = b.node("call_function", torch.ops.mohdify.write_add.default, (*w.args, h2), w)  # [T, D]
            out = b.node("call_function", unflatten_tokens, (o2, h), add)                # h's shape
        add.replace_all_uses_with(out)
        graph.erase_node(add)
        for n in reversed(chain):
            graph.erase_node(n)
        report.writes_fused += 1


def fuse_graph(gm: fx.GraphModule) -> FuseReport:
    """Run the two sub-passes (module docstring) on a mohdified model's dynamo graph, in place."""
    report = FuseReport()
    graph = gm.graph
    builder = GraphBuilder(graph, graph_fake_mode(graph))
    _merge_reads(graph, builder, report)
    _fuse_writes(graph, builder, report)
    graph.lint()
    gm.recompile()
    return report
