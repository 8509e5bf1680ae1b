"""Analysis: find the residual branches of a captured graph, their readers and their writer.

IR level: any FX graph whose nodes carry shapes (export: meta['val'], dynamo: meta['example_value']);
ATen targets (export) and torch-level targets (dynamo) are both recognised (see graphview.py, which
also reads dynamo's in-place ops as functional).

Pattern, per MOHD_SPEC.md:
  - a *residual sum* is a chain of adds read as one sum: `x + a + m`, `(x + a) + m` and `a + m + x`
    are the same sum of three terms (an add whose only user is another add of the same size is an
    inner node of the chain); adds may be written `+`, `+=`, `torch.add`, `h.add(f)`, `h.add_(f, alpha=.)`;
  - a *stream term* of a sum is a term whose value is, through value-preserving ops (casts such as
    `residual.to(torch.float32)`, copies, a scale by a scalar or a vector such as DeepNorm's
    `alpha * h`), a node h of the sum's full size that is an ancestor of the linear layer considered;
  - a *writer* is a linear layer W whose output value reaches a residual sum only through
    *zero-preserving* ops (below), where another term of the sum is a stream term for W, and the sum
    has W's output size with last dim out_features(W) = D;
  - the *readers* of that branch are the linear layers R with in_features = D that are ancestors
    of W and whose input is reached from h without passing through a linear layer (so the k/v of
    cross-attention, which read the encoder stream, are not readers of the decoder branch);
  - every other term of a residual sum that depends on h but does not come from a writer (MoE
    experts: stacked expert weights, each seeing only the tokens routed to it) is reported as a
    skipped branch, named after the outermost module that computed it (unwritten.py).
Reading a chain of adds as one sum and following a term back to the stream: sums.py.
A "linear layer" is whatever `resolve` recognises: a layer called as a module (`LinearRef.layer`),
or a product with a 2-D weight parameter elsewhere (x @ W, einsum, F.linear on a slice): those find
their branch like any other, so that the plan can say truly why they stay dense.

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
import itertools
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from torch import fx

from .graph_names import node_value
from .graphview import (
    GraphView,
    canonical,
    innermost_module,
    is_add,
    is_div,
    is_mul,
    is_sub,
    last_dim,
    numel,
    op_name,
)
from .sums import stream_source, sum_root, sum_terms
from .targets import ADD_TARGETS, LINEAR_TARGETS, PASS_FUNCTIONS, PASS_METHODS
from .unwritten import report_unwritten_terms

__all__ = ["LinearRef", "BranchMatch", "GraphAnalysis", "analyze_graph", "LINEAR_TARGETS", "ADD_TARGETS",
           "innermost_module", "canonical"]


@dataclass
class LinearRef:
    """A call of a linear map found in a graph.

    layer: True for a linear layer called as a module (its own forward: what MoHD can swap);
    False for a product with a 2-D weight parameter elsewhere (`x @ W.T` in a parent module,
    einsum, F.linear on a slice, a bare nn.Parameter); `where` then names that parameter.
    """

    node: fx.Node
    input: fx.Node
    fqn: str
    in_features: int
    out_features: int
    layer: bool = True
    where: str = ""


@dataclass
class BranchMatch:
    """A residual branch found in one graph."""

    writer: LinearRef
    readers: list[LinearRef]
    add: fx.Node          # the residual sum (the last add of its chain)
    stream: fx.Node       # h: the residual stream the branch reads and the sum adds to
    input_desc: str       # how the readers' input is derived from h (and what follows the writer)


@dataclass
class GraphAnalysis:
    hidden_size: Optional[int]
    branches: list[BranchMatch]
    linears: list[LinearRef]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    view: Optional[GraphView] = None
    blocked: list[LinearRef] = field(default_factory=list)   # writers whose output reaches the sum through
                                                              # an op that does not keep zeros
    dense_sums: list[fx.Node] = field(default_factory=list)   # residual sums with a term from no writer (MoE)


def _residual_sum(view: GraphView, n: fx.Node, lin: LinearRef, size: Optional[int]):
    """(sum root, h) if the add `n` that `lin`'s output reaches is a residual sum for it, else None."""
    if not is_add(n):
        return None
    root = sum_root(view, n)
    if numel(root) != size or last_dim(root) != lin.out_features:
        return None

    def is_stream(s: fx.Node) -> bool:
        return numel(s) == size and last_dim(s) == lin.out_features and s in view.ancestors(lin.node)
    for t in sum_terms(view, root):
        if t is lin.node or lin.node in view.ancestors(t):
            continue
        h = stream_source(view, t, is_stream)
        if h is not None:
            return root, h
    return None


def _passes_zero(view: GraphView, n: fx.Node, src: fx.Node, writer: fx.Node) -> bool:
    """Does op `n` keep the zeros of its operand `src` (a value derived from `writer`)?"""
    if n.op not in ("call_function", "call_method"):
        return False
    if is_mul(n):
        return True
    if is_div(n):
        return view.arg(n, 0) is src and not any(a is src for a in view.inputs(n)[1:])
    if is_add(n) or is_sub(n):
        others = [a for a in view.inputs(n) if a is not src]
        return all(writer not in view.ancestors(o) and o is not writer for o in others)
    if n.op == "call_function" and n.target is operator.getitem:   # first output of e.g. native_dropout
        return isinstance(node_value(src), (tuple, list)) and len(n.args) > 1 and n.args[1] == 0
    table = PASS_METHODS if n.op == "call_method" else PASS_FUNCTIONS
    return n.target in table and view.arg(n, 0) is src


def _walk_to_add(view: GraphView, lin: LinearRef, linear_nodes: set, strict: bool, limit: int = 400):
    """Walk forward from a linear layer to the residual sum that its output reaches.

    strict: only through zero-preserving ops. Returns (sum root, h, own) or None, where `own` is the
    set of nodes carrying the writer's own value before it is summed with anything else.
    """
    size = numel(lin.node)
    tie = itertools.count()
    heap = [(view.order[u], next(tie), u, lin.node, True) for u in view.users(lin.node)]
    seen, own = set(), {lin.node}
    while heap and len(seen) < limit:
        _, _, n, src, src_own = heapq.heappop(heap)
        if n in seen or n in linear_nodes:
            continue
        hit = _residual_sum(view, n, lin, size)
        if hit is not None:
            return (*hit, own)
        if strict and not _passes_zero(view, n, src, lin.node):
            continue
        seen.add(n)
        is_own = src_own and not (is_add(n) or is_sub(n))
        if is_own:
            own.add(n)
        for u in view.users(n):
            heapq.heappush(heap, (view.order[u], next(tie), u, n, is_own))
    return None


def _blocking_op(view: GraphView, lin: LinearRef, add: fx.Node, prefix: str) -> str:
    """The first op between a linear and its residual add that does not keep zeros, described."""
    between = [n for n in view.ancestors(add) if lin.node in view.ancestors(n)] + [add]
    for n in sorted(between, key=view.order.get):
        srcs = [s for s in view.inputs(n) if s is lin.node or s in between]
        if srcs and not any(_passes_zero(view, n, s, lin.node) for s in srcs):
            fqn, cls = innermost_module(n, prefix)
            return f"{op_name(n)}" + (f" in {fqn} ({cls})" if fqn else "")
    return "an op"


def _reach_without_linears(view: GraphView, start: fx.Node, within: set, linear_nodes: set) -> set:
    """Nodes reached from `start` inside `within` without passing through a linear layer."""
    reached, todo = {start}, [start]
    while todo:
        n = todo.pop()
        for u in view.users(n):
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
    view = GraphView(graph)
    linears = [ref for n in graph.nodes if (ref := resolve(n)) is not None]
    for ref in linears:   # the version of the input the call really reads (after in-place ops)
        ref.input = view.arg(ref.node, ref.node.args.index(ref.input)) if ref.input in ref.node.args else ref.input
    linear_nodes = {ref.node for ref in linears}
    found, blocked = [], []
    for lin in linears:
        hit = _walk_to_add(view, lin, linear_nodes, strict=True)
        if hit is not None:
            found.append((lin, *hit))
        elif (loose := _walk_to_add(view, lin, linear_nodes, strict=False)) is not None:
            blocked.append((lin, loose[0]))
    if not found:
        return GraphAnalysis(None, [], linears, view=view)
    hidden = Counter(lin.out_features for lin, *_ in found).most_common(1)[0][0]
    analysis = GraphAnalysis(hidden, [], linears, view=view)
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
            analysis.blocked.append(lin)
            analysis.skipped.append((lin.fqn, f"its output reaches the residual add only through "
                                     f"{_blocking_op(view, lin, add, prefix)}, which does not keep zeros "
                                     "(e.g. a LayerNorm subtracts the mean), so it is not a MoHD writer; left dense"))
    report_unwritten_terms(view, analysis, owns, prefix)
    return analysis
