"""Analysis: find the residual branches of a captured graph, their readers and their writer.

IR level: any FX graph whose nodes carry shapes (export: meta['val'], dynamo: meta['example_value']);
ATen targets (export) and torch-level targets (dynamo) are both recognised.

Pattern, per MOHD_SPEC.md:
  - a *writer* is a linear layer W whose output value reaches an add node A only through
    *zero-preserving* ops (below), where A's other operand h (the residual stream) is an ancestor
    of W, is not a descendant of W, and A has W's output size with last dim out_features(W) = D;
  - the *readers* of that branch are the linear layers R with in_features = D that are ancestors
    of W and whose input is reached from h without passing through a linear layer (so the k/v of
    cross-attention, which read the encoder stream, are not readers of the decoder branch);
  - every other term of a residual add that depends on h but does not come from a writer (MoE
    experts: stacked expert weights, each seeing only the tokens routed to it) is reported as a
    skipped branch, named after the outermost module that computed it.

Zero-preserving ops (decision for the spec's "a zero-preserving post-norm"): an op may sit between
the writer and the residual add if a zero entry of the writer's output stays a zero entry, so the
groups MoHD leaves inactive stay exactly zero on the stream:
  - shape-only ops and casts (view, reshape, transpose, to, contiguous, dropout, ...);
  - multiplication by anything (per-token scales such as the rsqrt of RMSNorm, a LayerScale, a
    sigmoid gate) and division of the value by anything;
  - f(0) = 0 element-wise activations (relu, gelu, silu, tanh, neg);
  - RMSNorm in either form (aten.rms_norm, or HF's x * rsqrt(mean(x^2) + eps) * w, which is the
    multiplication rule): it scales each token by one number, so zeros stay zeros. This is how the
    sandwich norms of Gemma 2/3 and Olmo2's output norms are accepted;
  - an add or sub whose other operand does not depend on W (a bias, or a parallel branch's output
    in GPT-J / Falcon / Phi / GPT-NeoX, which are summed before the residual add).
LayerNorm is NOT zero-preserving, with or without bias: it subtracts the token mean, so inactive
groups of the writer's output would become -mean/std. A linear whose output reaches the residual
add only through such an op is not a writer; it is reported in `skipped` naming the op.
Preconditions: linear layers are recognised by `resolve(node) -> LinearRef | None`.
Afterwards: nothing in the graph or the model has changed; the result is a GraphAnalysis.
"""

from __future__ import annotations

import heapq
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx

from .capture import _join, module_path, node_value

__all__ = ["LinearRef", "BranchMatch", "GraphAnalysis", "analyze_graph", "LINEAR_TARGETS", "ADD_TARGETS",
           "innermost_module", "canonical"]

aten = torch.ops.aten
LINEAR_TARGETS = {
    aten.linear.default: (0, 1), aten.addmm.default: (1, 2), aten.mm.default: (0, 1), aten.matmul.default: (0, 1),
    torch._C._nn.linear: (0, 1), torch.nn.functional.linear: (0, 1), torch.addmm: (1, 2), torch.mm: (0, 1),
    torch.matmul: (0, 1), operator.matmul: (0, 1),
}  # target -> (index of the input arg, index of the weight arg)
ADD_TARGETS = {aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd, torch.add}
SUB_TARGETS = {aten.sub.Tensor, aten.sub_.Tensor, operator.sub, operator.isub, torch.sub}
# Ops that return their input unchanged in value (casts to the same dtype, aliases, copies).
ALIAS_TARGETS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
                 aten.clone.default, aten.contiguous.default, aten.detach.default}
ALIAS_METHODS = {"to", "type", "contiguous", "clone", "detach", "float", "type_as"}
# Zero-preserving ops whose first argument carries the value (see the module docstring).
_PASS_FUNCTIONS = ALIAS_TARGETS | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.t.default, aten.numpy_T.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.flatten.using_ints, aten.expand.default, aten.type_as.default, aten.dropout.default,
    aten.lift_fresh_copy.default, aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default,
    aten.neg.default, aten.rms_norm.default, aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor,
    torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unsqueeze, torch.squeeze, torch.dropout,
    F.dropout, F.relu, F.gelu, F.silu, F.rms_norm, torch.relu, torch.tanh, torch.neg, operator.neg,
    operator.mul, operator.imul, torch.mul,
}
_PASS_METHODS = ALIAS_METHODS | {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "flatten",
                                 "expand", "half", "bfloat16", "relu", "tanh", "neg", "mul", "mul_"}
_MUL_TARGETS = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, operator.mul, operator.imul, torch.mul}
_DIV_TARGETS = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, operator.truediv, operator.itruediv, torch.div}


@dataclass
class LinearRef:
    """A call of a linear layer found in a graph."""

    node: fx.Node
    input: fx.Node
    fqn: str
    in_features: int
    out_features: int


@dataclass
class BranchMatch:
    """A residual branch found in one graph."""

    writer: LinearRef
    readers: list[LinearRef]
    add: fx.Node          # the residual add
    stream: fx.Node       # h: the residual-stream operand of the add
    input_desc: str       # how the readers' input is derived from h (and what follows the writer)


@dataclass
class GraphAnalysis:
    hidden_size: Optional[int]
    branches: list[BranchMatch]
    linears: list[LinearRef]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def innermost_module(node: fx.Node, prefix: str = "") -> tuple[str, str]:
    """(qualified name, class name) of the innermost module a node was traced in; ("", "") if none."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    return _join(prefix, module_path(path)), _cls_name(cls)


def _cls_name(cls) -> str:
    return cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]


def _is_alias(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ALIAS_TARGETS) or \
        (node.op == "call_method" and node.target in ALIAS_METHODS)


def canonical(node: fx.Node) -> fx.Node:
    """The node whose value `node` merely passes on (through same-shape casts, aliases, copies)."""
    while True:
        src = node.args[0] if node.args else None
        if not _is_alias(node) or not isinstance(src, fx.Node):
            return node
        a, b = node_value(node), node_value(src)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return node
        node = src


def _numel(node: fx.Node) -> Optional[int]:
    val = node_value(node)
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return int(val.numel())
    except (TypeError, RuntimeError):   # symbolic sizes
        return None


def _last_dim(node: fx.Node) -> Optional[int]:
    val = node_value(node)
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    try:
        return int(val.shape[-1])
    except (TypeError, RuntimeError):
        return None


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", None) or str(t)


class _Graph:
    """networkx view of an FX graph with cached ancestor sets."""

    def __init__(self, graph: fx.Graph):
        self.g = nx.DiGraph()
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        for n in graph.nodes:
            self.g.add_node(n)
            for inp in n.all_input_nodes:
                self.g.add_edge(inp, n)
        self._anc: dict[fx.Node, set] = {}

    def ancestors(self, n: fx.Node) -> set:
        if n not in self._anc:
            self._anc[n] = nx.ancestors(self.g, n)
        return self._anc[n]


def _is_add(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in ADD_TARGETS and len(n.all_input_nodes) == 2


def _passes_zero(view: _Graph, n: fx.Node, src: fx.Node, writer: fx.Node) -> bool:
    """Does op `n` keep the zeros of its operand `src` (a value derived from `writer`)?"""
    if n.op == "call_method":
        return n.target in _PASS_METHODS and n.args and n.args[0] is src
    if n.op != "call_function":
        return False
    if n.target in _MUL_TARGETS:
        return True
    if n.target in _DIV_TARGETS:
        return bool(n.args) and n.args[0] is src and not any(a is src for a in n.args[1:])
    if n.target in ADD_TARGETS or n.target in SUB_TARGETS:
        others = [a for a in n.all_input_nodes if a is not src]
        return all(writer not in view.ancestors(o) and o is not writer for o in others)
    if n.target is operator.getitem:   # first output of a tuple-returning op such as native_dropout
        return isinstance(node_value(src), (tuple, list)) and len(n.args) > 1 and n.args[1] == 0
    return n.target in _PASS_FUNCTIONS and bool(n.args) and n.args[0] is src


def _is_residual_add(view: _Graph, n: fx.Node, lin: LinearRef, size: Optional[int]) -> Optional[fx.Node]:
    """The stream operand h if `n` is the residual add of `lin`'s output, else None."""
    if not _is_add(n):
        return None
    for other in n.args[:2]:
        if (isinstance(other, fx.Node) and lin.node not in view.ancestors(other)
                and other in view.ancestors(lin.node) and _numel(n) == size
                and _last_dim(n) == lin.out_features and _last_dim(other) == lin.out_features):
            return other
    return None


def _walk_to_add(view: _Graph, lin: LinearRef, linear_nodes: set, strict: bool, limit: int = 400):
    """Walk forward from a linear layer to the residual add that its output reaches.

    strict: only through zero-preserving ops. Returns (add, h, own) or None, where `own` is the set
    of nodes carrying the writer's own value before it is summed with anything else.
    """
    size = _numel(lin.node)
    heap = [(view.order[u], u, lin.node, True) for u in lin.node.users]
    seen, own = set(), {lin.node}
    while heap and len(seen) < limit:
        _, n, src, src_own = heapq.heappop(heap)
        if n in seen or n in linear_nodes:
            continue
        stream = _is_residual_add(view, n, lin, size)
        if stream is not None:
            return n, stream, own
        if strict and not _passes_zero(view, n, src, lin.node):
            continue
        seen.add(n)
        is_own = src_own and not (n.op == "call_function" and (n.target in ADD_TARGETS or n.target in SUB_TARGETS))
        if is_own:
            own.add(n)
        for u in n.users:
            heapq.heappush(heap, (view.order[u], u, n, is_own))
    return None


def _blocking_op(view: _Graph, lin: LinearRef, add: fx.Node, prefix: str) -> str:
    """The first op between a linear and its residual add that does not keep zeros, described."""
    between = [n for n in view.ancestors(add) if lin.node in view.ancestors(n)]
    for n in sorted(between, key=view.order.get):
        srcs = [s for s in n.all_input_nodes if s is lin.node or s in between]
        if srcs and not any(_passes_zero(view, n, s, lin.node) for s in srcs):
            fqn, cls = innermost_module(n, prefix)
            return f"{_op_name(n)}" + (f" in {fqn} ({cls})" if fqn else "")
    return "an op"


def _reach_without_linears(view: _Graph, start: fx.Node, within: set, linear_nodes: set) -> set:
    """Nodes reached from `start` inside `within` without passing through a linear layer."""
    reached, todo = {start}, [start]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in within and u not in reached and u not in linear_nodes:
                reached.add(u)
                todo.append(u)
    return reached


def _describe(reader_inputs: list[fx.Node], stream: fx.Node, own: set, writer: LinearRef, prefix: str) -> str:
    x = reader_inputs[0]
    if all(canonical(r) is canonical(stream) for r in reader_inputs):
        desc = "h (the residual stream itself)"
    else:
        fqn, cls = innermost_module(x, prefix)
        desc = f"f(h) via {fqn} ({cls})" if fqn else f"f(h) via node {x.name}"
    for n in sorted(own, key=lambda n: n.name):   # a norm on the branch output (sandwich norm, Olmo2)
        fqn, cls = innermost_module(n, prefix)
        if "norm" in cls.lower() and fqn != writer.fqn:
            return f"{desc}; output through {fqn} ({cls}) before the add"
    return desc


def analyze_graph(graph: fx.Graph, resolve: Callable[[fx.Node], Optional[LinearRef]],
                  prefix: str = "") -> GraphAnalysis:
    """Find residual branches in `graph`; `resolve` recognises linear-layer calls."""
    view = _Graph(graph)
    linears = [ref for n in graph.nodes if (ref := resolve(n)) is not None]
    linear_nodes = {ref.node for ref in linears}
    found, blocked = [], []
    for lin in linears:
        hit = _walk_to_add(view, lin, linear_nodes, strict=True)
        if hit is not None:
            found.append((lin, *hit))
        elif (loose := _walk_to_add(view, lin, linear_nodes, strict=False)) is not None:
            blocked.append((lin, loose[0]))
    if not found:
        return GraphAnalysis(None, [], linears)
    hidden = Counter(lin.out_features for lin, *_ in found).most_common(1)[0][0]
    analysis = GraphAnalysis(hidden, [], linears)
    owns: dict[fx.Node, list] = {}
    for lin, add, stream, own in found:
        if lin.out_features != hidden:
            analysis.skipped.append((lin.fqn, f"writes width {lin.out_features}, not the hidden size {hidden}"))
            continue
        within = view.ancestors(lin.node)
        reach = _reach_without_linears(view, stream, within, linear_nodes)
        readers = [r for r in linears if r.node in within and r.in_features == hidden and r.input in reach]
        if not readers:
            analysis.skipped.append((lin.fqn, "writes the residual stream but no linear layer of its branch reads it"))
            continue
        owns.setdefault(add, []).append((lin, own))
        desc = _describe([r.input for r in readers], stream, own, lin, prefix)
        analysis.branches.append(BranchMatch(lin, readers, add, stream, desc))
    for lin, add in blocked:
        if lin.out_features == hidden:
            analysis.skipped.append((lin.fqn, f"its output reaches the residual add only through "
                                     f"{_blocking_op(view, lin, add, prefix)}, which does not keep zeros "
                                     "(e.g. a LayerNorm subtracts the mean), so it is not a MoHD writer; left dense"))
    _unwritten_terms(view, analysis, owns, prefix)
    return analysis


def _stream_adds(view: _Graph, analysis: GraphAnalysis) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(add, h, update) of every residual add on the stream, found by a writer or not."""
    stream = {canonical(b.stream) for b in analysis.branches} | {b.add for b in analysis.branches}
    by_add = {b.add: b.stream for b in analysis.branches}
    out = []
    for n in view.order:
        if n in by_add:
            h = by_add[n]
            out.append((n, h, next(a for a in n.args[:2] if a is not h)))
            continue
        if not _is_add(n) or _last_dim(n) != analysis.hidden_size:
            continue
        a, b = n.args[:2]
        for h, other in ((a, b), (b, a)):
            if canonical(h) in stream and canonical(other) not in stream and _numel(n) == _numel(h) \
                    and h in view.ancestors(other):
                out.append((n, h, other))
                break
    return out


def _terms(update: fx.Node) -> list[fx.Node]:
    """Split a branch update into its summands, looking through shape-only ops."""
    out, todo, seen = [], [update], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in ADD_TARGETS:
            todo.extend(n.all_input_nodes)
        elif (n.op == "call_function" and n.target in _PASS_FUNCTIONS - _MUL_TARGETS - {F.rms_norm,
              aten.rms_norm.default}) or (n.op == "call_method" and n.target in _PASS_METHODS - {"mul", "mul_"}):
            todo.extend(n.all_input_nodes[:1])
        else:
            out.append(n)
    return out


def _unwritten_terms(view: _Graph, analysis: GraphAnalysis, owns: dict, prefix: str) -> None:
    """Report residual-add terms that depend on h but come from no writer (e.g. MoE experts)."""
    for add, h, update in _stream_adds(view, analysis):
        writers = owns.get(add, [])
        covered = set().union(*(own for _, own in writers)) if writers else set()
        for term in _terms(update):
            if term in covered or h not in view.ancestors(term):
                continue
            owner, cls = _term_owner(term, h, [w.fqn for w, _ in writers], prefix)
            analysis.skipped.append((owner or term.name, (
                f"residual branch ({cls or 'unknown module'}) whose output does not come from a linear writer "
                "(e.g. MoE experts, which hold stacked expert weights and see only the tokens routed to them); "
                "left dense")))


def _term_owner(term: fx.Node, h: fx.Node, writers: list[str], prefix: str) -> tuple[str, str]:
    """The outermost module that computed `term` from h and holds no writer of the same add."""
    stack = term.meta.get("nn_module_stack") or {}
    hstack = h.meta.get("nn_module_stack") or {}
    for key, (path, cls) in stack.items():
        if key in hstack:
            continue
        name = _join(prefix, module_path(path))
        if not any(w == name or w.startswith(name + ".") for w in writers):
            return name, _cls_name(cls)
    return innermost_module(term, prefix)
