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
    skipped branch, named after the outermost module that computed it.
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

from .graph_names import join_name, module_path, node_value
from .graphview import (
    GraphView,
    canonical,
    cls_name,
    innermost_module,
    is_add,
    is_alias,
    is_div,
    is_mul,
    is_shape_only,
    is_sub,
    last_dim,
    numel,
    op_name,
)
from .targets import ADD_TARGETS, LINEAR_TARGETS, PASS_FUNCTIONS, PASS_METHODS

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


def _through_copies(view: GraphView, n: fx.Node) -> Optional[fx.Node]:
    """The only user of `n`, looking through single-use copies and casts of the same size
    (`h.clone().add_(f)` in an exported graph is clone, then add); None if `n` has several users."""
    users = view.users(n)
    while len(users) == 1 and is_alias(users[0]) and numel(users[0]) == numel(n) and len(view.users(users[0])) == 1:
        users = view.users(users[0])
    return users[0] if len(users) == 1 else None


def _sum_root(view: GraphView, n: fx.Node) -> fx.Node:
    """The last add of the chain of adds `n` is part of (an add whose only user is an add of its size)."""
    while True:
        user = _through_copies(view, n)
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
        single = _through_copies(view, inner) is not None and numel(inner) == numel(root)
        if is_add(inner) and (inner is root or single):
            todo.extend(reversed(view.add_operands(inner)))
        else:
            out.append(n)
    return out


def _stream_parent(view: GraphView, n: fx.Node) -> Optional[fx.Node]:
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
    """The first node from `term` back through `_stream_parent` that `accept`s, or None."""
    node = term
    for _ in range(limit):
        if node is None:
            return None
        if accept(node):
            return node
        node = _stream_parent(view, node)
    return None


def _residual_sum(view: GraphView, n: fx.Node, lin: LinearRef, size: Optional[int]):
    """(sum root, h) if the add `n` that `lin`'s output reaches is a residual sum for it, else None."""
    if not is_add(n):
        return None
    root = _sum_root(view, n)
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
    _unwritten_terms(view, analysis, owns, prefix)
    return analysis


def _split(update: fx.Node, view: GraphView) -> list[fx.Node]:
    """Split a term of a residual sum into its summands, looking through adds and shape-only ops."""
    out, todo, seen = [], [update], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_add(n):
            todo.extend(view.inputs(n))
        elif is_shape_only(n):
            todo.extend(view.inputs(n)[:1])
        elif (scaled := _stream_parent(view, n)) is not None:   # a LayerScale, a router weight
            todo.append(scaled)
        else:
            out.append(n)
    return out


def _unwritten_terms(view: GraphView, analysis: GraphAnalysis, owns: dict, prefix: str) -> None:
    """Report residual-sum terms that depend on h but come from no writer (e.g. MoE experts)."""
    known = {b.stream for b in analysis.branches} | {b.add for b in analysis.branches}
    known |= {canonical(n) for n in known}
    roots = list(dict.fromkeys(b.add for b in analysis.branches))
    roots += [n for n in view.order if is_add(n) and n not in roots and last_dim(n) == analysis.hidden_size
              and _sum_root(view, n) is n]
    for root in roots:
        terms = sum_terms(view, root)
        size = numel(root)

        def on_stream(s: fx.Node, size: Optional[int] = size) -> bool:
            return (s in known or canonical(s) in known) and numel(s) == size
        streams = {t: h for t in terms if (h := stream_source(view, t, on_stream)) is not None}
        if not streams and len(terms) > 1:   # a stream no branch has read yet (post-norm, before an MoE)
            for t in terms:
                others = [o for o in terms if o is not t]

                def feeds_all(s: fx.Node, size: Optional[int] = size, others=others) -> bool:
                    return numel(s) == size and all(s in view.ancestors(o) for o in others)
                if (h := stream_source(view, t, feeds_all)) is not None:
                    streams = {t: h}
                    break
        if not streams or len(streams) == len(terms):
            continue
        h = next(iter(streams.values()))
        sources = _stream_chain(view, h)
        writers = owns.get(root, [])
        covered = set().union(*(own for _, own in writers)) if writers else set()
        for term in (t for t in terms if t not in streams):
            for part in _split(term, view):
                if part in covered or not sources & view.ancestors(part) or \
                        any(b.node in view.ancestors(part) for b in analysis.blocked):   # reported with its writer
                    continue
                owner, cls = _term_owner(part, h, [w.fqn for w, _ in writers], prefix)
                analysis.dense_sums.append(root)
                analysis.skipped.append((owner or part.name, (
                    f"residual branch ({cls or 'unknown module'}) whose output does not come from a linear writer "
                    "(e.g. MoE experts, which hold stacked expert weights and see only the tokens routed to them); "
                    "left dense")))


def _stream_chain(view: GraphView, h: fx.Node, limit: int = 8) -> set:
    """h and the nodes it carries the value of (through copies, casts and scales; their canonical forms)."""
    out, node = set(), h
    for _ in range(limit):
        if node is None:
            break
        out |= {node, canonical(node)}
        node = _stream_parent(view, node)
    return out


def _term_owner(term: fx.Node, h: fx.Node, writers: list[str], prefix: str) -> tuple[str, str]:
    """The outermost module that computed `term` from h and holds no writer of the same add."""
    stack = term.meta.get("nn_module_stack") or {}
    hstack = h.meta.get("nn_module_stack") or {}
    for key, (path, cls) in stack.items():
        if key in hstack:
            continue
        name = join_name(prefix, module_path(path))
        if not any(w == name or w.startswith(name + ".") for w in writers):
            return name, cls_name(cls)
    return innermost_module(term, prefix)
