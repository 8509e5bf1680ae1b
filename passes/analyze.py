"""Analysis: find the residual branches of a captured graph, their readers and their writer.

IR level: any FX graph whose nodes carry shapes (export: meta['val'], dynamo: meta['example_value']).
Pattern, per MOHD_SPEC.md:
  - a *writer* is a linear layer W whose output reaches an add node A through any ops but another
    linear layer, where A's other operand h (the residual stream) is an ancestor of W, is not a
    descendant of W, and A has W's output size with last dim out_features(W) = D;
  - the *readers* of that branch are the linear layers R with in_features = D that are ancestors
    of W and whose input is reached from h without passing through a linear layer (so the k/v of
    cross-attention, which read the encoder stream, are not readers of the decoder branch);
  - a residual add whose branch output does not come from a linear writer (e.g. MoE experts that
    are not nn.Linear modules) is reported as a skipped branch.
Preconditions: linear layers are recognised by `resolve(node) -> LinearRef | None`.
Afterwards: nothing in the graph or the model has changed; the result is a list of BranchMatch.
"""

from __future__ import annotations

import heapq
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import networkx as nx
import torch
from torch import fx

from .capture import module_path, node_value

__all__ = ["LinearRef", "BranchMatch", "GraphAnalysis", "analyze_graph", "LINEAR_TARGETS", "ADD_TARGETS"]

aten = torch.ops.aten
LINEAR_TARGETS = {
    aten.linear.default: (0, 1), aten.addmm.default: (1, 2), aten.mm.default: (0, 1), aten.matmul.default: (0, 1),
    torch._C._nn.linear: (0, 1), torch.nn.functional.linear: (0, 1), torch.addmm: (1, 2), torch.mm: (0, 1),
    torch.matmul: (0, 1), operator.matmul: (0, 1),
}  # target -> (index of the input arg, index of the weight arg)
ADD_TARGETS = {aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd, torch.add}
# Ops that return their input unchanged in value (casts to the same dtype, aliases, copies).
ALIAS_TARGETS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
                 aten.clone.default, aten.contiguous.default, aten.detach.default}
ALIAS_METHODS = {"to", "type", "contiguous", "clone", "detach", "float", "type_as"}


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
    input_desc: str       # how the readers' input is derived from h


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
    cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    name = module_path(path)
    return (f"{prefix}.{name}" if prefix and name else prefix or name), cls_name


def canonical(node: fx.Node) -> fx.Node:
    """The node whose value `node` merely passes on (through same-shape casts, aliases, copies)."""
    while True:
        is_alias = (node.op == "call_function" and node.target in ALIAS_TARGETS) or \
            (node.op == "call_method" and node.target in ALIAS_METHODS)
        src = node.args[0] if node.args else None
        if not is_alias or not isinstance(src, fx.Node):
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


def _residual_add(view: _Graph, lin: LinearRef, linear_nodes: set, limit: int = 400) -> Optional[tuple]:
    """Walk forward from a linear layer to the add that puts its output on the residual stream."""
    size = _numel(lin.node)
    heap = [(view.order[u], u) for u in lin.node.users]
    seen = set()
    while heap and len(seen) < limit:
        _, n = heapq.heappop(heap)
        if n in seen or n in linear_nodes:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in ADD_TARGETS and len(n.all_input_nodes) == 2:
            a, b = n.args[0], n.args[1]
            for other in (a, b):
                if (isinstance(other, fx.Node) and lin.node not in view.ancestors(other)
                        and other in view.ancestors(lin.node) and _numel(n) == size
                        and _last_dim(n) == lin.out_features and _last_dim(other) == lin.out_features):
                    return n, other
        for u in n.users:
            heapq.heappush(heap, (view.order[u], u))
    return None


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


def _describe_input(reader_inputs: list[fx.Node], stream: fx.Node, prefix: str) -> str:
    x = reader_inputs[0]
    if all(r is stream for r in reader_inputs):
        return "h (the residual stream itself, post-norm)"
    fqn, cls = innermost_module(x, prefix)
    if fqn:
        return f"f(h) via {fqn} ({cls})"
    return f"f(h) via node {x.name}"


def analyze_graph(graph: fx.Graph, resolve: Callable[[fx.Node], Optional[LinearRef]],
                  prefix: str = "") -> GraphAnalysis:
    """Find residual branches in `graph`; `resolve` recognises linear-layer calls."""
    view = _Graph(graph)
    linears = [ref for n in graph.nodes if (ref := resolve(n)) is not None]
    linear_nodes = {ref.node for ref in linears}
    found = []
    for lin in linears:
        hit = _residual_add(view, lin, linear_nodes)
        if hit is not None:
            found.append((lin, *hit))
    if not found:
        return GraphAnalysis(None, [], linears)
    hidden = Counter(lin.out_features for lin, _, _ in found).most_common(1)[0][0]
    analysis = GraphAnalysis(hidden, [], linears)
    for lin, add, stream in found:
        if lin.out_features != hidden:
            analysis.skipped.append((lin.fqn, f"writes width {lin.out_features}, not the hidden size {hidden}"))
            continue
        within = view.ancestors(lin.node)
        reach = _reach_without_linears(view, stream, within, linear_nodes)
        readers = [r for r in linears if r.node in within and r.in_features == hidden and r.input in reach]
        if not readers:
            analysis.skipped.append((lin.fqn, "writes the residual stream but no linear layer of its branch reads it"))
            continue
        desc = _describe_input([r.input for r in readers], stream, prefix)
        analysis.branches.append(BranchMatch(lin, readers, add, stream, desc))
    _orphan_branches(view, analysis, prefix)
    return analysis


def _orphan_branches(view: _Graph, analysis: GraphAnalysis, prefix: str) -> None:
    """Report residual adds on the stream whose branch has no linear writer (e.g. MoE blocks)."""
    stream = {canonical(b.stream) for b in analysis.branches} | {b.add for b in analysis.branches}
    adds = {b.add for b in analysis.branches}
    for n in view.order:
        if n in adds or n.op != "call_function" or n.target not in ADD_TARGETS or len(n.all_input_nodes) != 2:
            continue
        a, b = n.all_input_nodes
        for h, other in ((a, b), (b, a)):
            if canonical(h) in stream and canonical(other) not in stream and _last_dim(n) == analysis.hidden_size \
                    and _numel(n) == _numel(h) and h in view.ancestors(other):
                fqn, cls = innermost_module(other, prefix)
                owner = _branch_module(view, other, h, prefix) or fqn or other.name
                analysis.skipped.append((owner, f"residual branch ({cls or 'unknown module'}) whose output does "
                                         "not come from a linear writer (e.g. MoE experts); left dense"))
                break


def _branch_module(view: _Graph, out: fx.Node, h: fx.Node, prefix: str) -> str:
    """The outermost module that computed the branch output `out` from `h` (e.g. the MoE block)."""
    stack = out.meta.get("nn_module_stack")
    hstack = h.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    for key, (path, _cls) in stack.items():
        if key not in hstack:
            name = module_path(path)
            return f"{prefix}.{name}" if prefix and name else prefix or name
    return ""
