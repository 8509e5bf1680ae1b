"""Rewrite: a dense model's dynamo graph -> the same graph with magnitude-routed MoHD ops.

Used by `torch.compile(model, backend="mohd")` (mohdify/backend.py) on graphs of dense models.

IR level: the torch-level FX graph dynamo hands a backend, before AOT autograd. Parameters are
lifted to placeholders (dynamo's `grapharg` meta holds the real `nn.Parameter`), nodes carry fake
tensors in `meta['example_value']` and the module they ran in in `meta['nn_module_stack']`.

Pattern: the residual branches of `passes.analyze.analyze_graph`, where a linear layer is a call
    F.linear(x, W, b) / torch._C._nn.linear(x, W, b)    W: [O, I],
    torch.addmm(b, x, W)                                  W: [I, O] (GPT-2 Conv1D), or
    x @ V / torch.matmul(x, V) / x.mm(V)                  V: [I, O], a view of W (x @ self.weight.T)
traced inside a linear layer with its own weight, a parameter placeholder (or get_attr).
Each branch (readers R_j, writer W_o) becomes
    x2      = x.reshape(-1, D)                            once per distinct reader input x
    routing = route_tokens(x2, "magnitude", None, shared, routed, k, scaling, density)   (mask, scale, gates, _)
    R_j:  mohdify.read(x2, W_j, b_j, routing.mask, routing.scale), viewed back to [..., O_j]
    W_o:  mohdify.write(u.reshape(-1, I), W_o, b_o, routing.gates, None), viewed back to [..., D]
where the writer takes the routing of the input of the last reader that runs before it (what the
eager MoHDWriter takes from its branch). `route_tokens` is the function MoHDBranch.route calls:
the branch math is written once (mohdify/routing.py).

Preconditions: config.router == "magnitude" and config.fusion == "none" (a graph rewrite cannot add
parameters); num_groups divides the hidden size D (else ConfigError).
Which branches: the ones `passes.select.select_branches` chooses, the rule mohdify() follows on
the same model; every other linear layer is in the report with the reason it stays dense.
Afterwards: the graph lints and computes what the model mohdified eagerly with
MoHDConfig(router="magnitude", same groups/shared/top_k/scaling) computes (at delta = 1, what the
dense model computes). New nodes carry example values and the module stack of the layer they
replace. Nothing outside the graph changes.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

import mohdify.codegen  # noqa: F401 - registers torch.ops.mohdify.*
from mohdify.config import MoHDConfig
from mohdify.routing import route_tokens

from .analyze import BranchMatch, GraphAnalysis, LinearRef, analyze_graph
from .graph_names import node_value
from .graphview import is_add, last_dim, numel
from .layers import LayerTable
from .resolve import module_resolver
from .select import select_branches
from .targets import ADDMM_FNS, LINEAR_FNS, MATMUL_FNS, MATMUL_METHODS

__all__ = ["RewriteReport", "GraphBuilder", "graph_fake_mode", "rewrite_graph", "unflatten_tokens"]

@dataclass
class RewriteReport:
    """What `rewrite_graph` did to one graph."""

    hidden_size: Optional[int]
    branches: list[tuple[str, list[str], str]] = field(default_factory=list)   # (branch, readers, writer)
    skipped: list[tuple[str, str]] = field(default_factory=list)               # (layer, why left dense)
    linears: int = 0                                                           # linear calls in the graph

    @property
    def readers(self) -> int:
        return sum(len(r) for _, r, _ in self.branches)


def unflatten_tokens(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[T, O]` -> `[*like.shape[:-1], O]`: give a token-flattened result its leading dims back."""
    return y.view(*like.shape[:-1], y.shape[-1])


@dataclass
class _Call:
    """A linear-layer call as the rewrite replaces it: out = x @ W^T + b, with W stored [I, O] if transposed."""

    x: fx.Node
    w: fx.Node
    b: Optional[fx.Node]
    transposed: bool
    out: fx.Node   # the node whose uses the MoHD op takes over (the call, or the bias add after x @ W.T)


def _linear_call(ref: LinearRef, params: dict[str, str]) -> Optional[_Call]:
    """The parts of a linear-layer call the rewrite can replace, or None."""
    node = ref.node
    if node.op == "call_function" and node.target in LINEAR_FNS:
        args = list(node.args) + [None] * (3 - len(node.args))
        w = args[1] if args[1] is not None else node.kwargs.get("weight")
        b = args[2] if args[2] is not None else node.kwargs.get("bias")
        return _Call(ref.input, w, b, False, node)
    if node.op == "call_function" and node.target in ADDMM_FNS and len(node.args) == 3 and not node.kwargs:
        return _Call(ref.input, node.args[2], node.args[0], True, node)   # beta = alpha = 1
    matmul = (node.op == "call_function" and node.target in MATMUL_FNS) or \
        (node.op == "call_method" and node.target in MATMUL_METHODS)
    if not (matmul and len(node.args) == 2 and not node.kwargs and node.args[0] is not node.args[1]):
        return None
    call = _Call(ref.input, node.args[1], None, True, node)               # x @ W.T: the operand is [I, O]
    users = list(node.users)
    if len(users) == 1 and is_add(users[0]) and not users[0].kwargs:      # x @ W.T + b: the layer's own bias
        other = [a for a in users[0].args[:2] if a is not node]
        if len(other) == 1 and isinstance(other[0], fx.Node) and params.get(other[0].name) == f"{ref.fqn}.bias":
            call.b, call.out = other[0], users[0]
    return call


def _take_over(b: GraphBuilder, call: _Call, new: fx.Node, node: fx.Node) -> None:
    call.out.replace_all_uses_with(new)
    if call.out is not node:
        b.graph.erase_node(call.out)
    b.graph.erase_node(node)


class GraphBuilder:
    """Inserts nodes and gives each its fake example value and the module stack it stands for."""

    def __init__(self, graph: fx.Graph, fake_mode):
        self.graph = graph
        self.fake_mode = fake_mode

    def node(self, op: str, target, args: tuple, like: fx.Node, kwargs: Optional[dict] = None) -> fx.Node:
        new = self.graph.create_node(op, target, args, kwargs or {})
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                new.meta[key] = like.meta[key]
        vals = fx.node.map_arg(args, lambda n: n.meta.get("example_value"))
        if self.fake_mode is not None and all(a.meta.get("example_value") is not None for a in new.all_input_nodes):
            with self.fake_mode:
                if op == "call_method":
                    new.meta["example_value"] = getattr(vals[0], target)(*vals[1:])
                else:
                    new.meta["example_value"] = target(*vals, **(kwargs or {}))
        return new


def _route(b: GraphBuilder, x: fx.Node, hidden: int, config: MoHDConfig, before: fx.Node) -> tuple:
    """Insert the magnitude routing of branch input x before `before`: (x2, mask, scale, gates)."""
    val = node_value(x)
    with b.graph.inserting_before(before):
        x2 = b.node("call_method", "reshape", (x, -1, hidden), before)                      # [T, D]
        on_device = {"device": val.device}
        shared = b.node("call_function", torch.arange, (0, config.num_shared), before, on_device)  # [N_s]
        routed = b.node("call_function", torch.arange, (config.num_shared, config.num_groups), before,
                        on_device)                                                          # [N_r]
        routing = b.node("call_function", route_tokens, (x2, config.router, None, shared, routed, config.top_k,
                                                         config.scaling, config.density), before)
        mask, scale, gates = (b.node("call_function", operator.getitem, (routing, i), before) for i in range(3))
    return x2, mask, (scale if config.scaling != "none" else None), gates


def _replace_reader(b: GraphBuilder, ref: LinearRef, call: _Call, x2: fx.Node, mask: fx.Node,
                    alpha: Optional[fx.Node]) -> None:
    x, w, bias, transposed = call.x, call.w, call.b, call.transposed
    with b.graph.inserting_before(ref.node):
        weight = b.node("call_method", "t", (w,), ref.node) if transposed else w          # [O, D]
        y2 = b.node("call_function", torch.ops.mohdify.read.default, (x2, weight, bias, mask, alpha), ref.node)
        y = b.node("call_function", unflatten_tokens, (y2, x), ref.node)                  # [..., O]
    _take_over(b, call, y, ref.node)


def _replace_writer(b: GraphBuilder, ref: LinearRef, call: _Call, gates: fx.Node) -> None:
    u, w, bias, transposed = call.x, call.w, call.b, call.transposed
    with b.graph.inserting_before(ref.node):
        u2 = b.node("call_method", "reshape", (u, -1, ref.in_features), ref.node)         # [T, I]
        weight = b.node("call_method", "t", (w,), ref.node) if transposed else w          # [D, I]
        o2 = b.node("call_function", torch.ops.mohdify.write.default, (u2, weight, bias, gates, None), ref.node)
        o = b.node("call_function", unflatten_tokens, (o2, u), ref.node)                  # [..., D]
    _take_over(b, call, o, ref.node)


def _rewrite_branch(b: GraphBuilder, m: BranchMatch, readers: list[LinearRef], calls: dict, hidden: int,
                    config: MoHDConfig, order: dict) -> None:
    readers = sorted(readers, key=lambda r: order[r.node])
    routed: dict[fx.Node, tuple] = {}
    for r in readers:
        if r.input not in routed:
            routed[r.input] = _route(b, r.input, hidden, config, r.node)
        x2, mask, scale, _ = routed[r.input]
        _replace_reader(b, r, calls[r.node], x2, mask, scale)
    last = [r for r in readers if order[r.node] < order[m.writer.node]][-1]
    _replace_writer(b, m.writer, calls[m.writer.node], routed[last.input][3])


def graph_fake_mode(graph: fx.Graph):
    """The fake mode of the graph's example values (new nodes' values must come from the same one)."""
    from torch._subclasses.fake_tensor import FakeTensor
    for n in graph.nodes:
        val = n.meta.get("example_value")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def rewrite_graph(gm: fx.GraphModule, config: MoHDConfig) -> RewriteReport:
    """Rewrite the residual branches of a dense dynamo graph into magnitude-routed MoHD ops, in place.

    The branches are the ones `select_branches` chooses, the rule `mohdify()` follows. A branch that
    rule chooses but this graph cannot carry (dynamo split it across two graphs at a graph break, or
    a call the rewrite cannot replace) is left dense with a Python warning naming it.
    Raises ConfigError if config.num_groups does not divide the hidden size found.
    """
    table, params = LayerTable.of_dynamo_graph(gm)
    analysis = analyze_graph(gm.graph, module_resolver(table, "", params))
    hidden = analysis.hidden_size
    selection = select_branches([analysis], hidden, table)
    report = RewriteReport(hidden, linears=len(analysis.linears))
    for lin, why in _split_branches(analysis, params, set(selection.branches)):
        selection.skipped[lin.fqn] = why
        warnings.warn(f"mohd backend: {lin.fqn} left dense: {why}", UserWarning, stacklevel=2)
    rewrites = []
    for m, readers in selection.rewrites(analysis):
        calls = {r.node: _linear_call(r, params) for r in [*readers, m.writer]}
        bad = [r.fqn for r in [*readers, m.writer] if calls[r.node] is None]
        if bad:
            why = (f"{bad} call their weight in a form the backend cannot replace (einsum or a batched product); "
                   "mohdify() rewrites this branch; left dense here")
            selection.skipped[m.writer.fqn] = why
            warnings.warn(f"mohd backend: {m.writer.fqn} left dense: {why}", UserWarning, stacklevel=2)
        else:
            rewrites.append((m, readers, calls))
    report.skipped = sorted(selection.skipped.items())
    if not rewrites:
        return report
    config.check_hidden_size(hidden)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    builder = GraphBuilder(gm.graph, graph_fake_mode(gm.graph))
    for m, readers, calls in sorted(rewrites, key=lambda mr: order[mr[0].writer.node]):
        _rewrite_branch(builder, m, readers, calls, hidden, config, order)
        branch = selection.branches[m.writer.fqn]
        if all(w != branch.writer for _, _, w in report.branches):   # a block applied twice: one branch
            report.branches.append((branch.name, branch.readers, branch.writer))
    gm.graph.lint()
    gm.recompile()
    return report


def _split_branches(analysis: GraphAnalysis, params: dict[str, str], chosen: set) -> list[tuple[LinearRef, str]]:
    """Writers whose readers ran in an earlier graph: a linear layer whose output is added to an input
    of this graph of its size (the residual stream), and whose own input comes, with no linear layer
    between, from another input of this graph (the branch's activations): dynamo split the branch."""
    view, out = analysis.view, []
    linear_nodes = {lin.node for lin in analysis.linears}

    def inputs_of(start: fx.Node) -> set:   # the graph inputs (not parameters) `start` derives from
        seen, todo, found = set(), [start], set()
        while todo:
            n = todo.pop()
            if n in seen or n in linear_nodes:
                continue
            seen.add(n)
            if n.op == "placeholder" and n.name not in params:
                found.add(n)
            todo.extend(view.inputs(n))
        return found
    for lin in analysis.linears:
        if lin.fqn in chosen or not lin.layer:
            continue
        add = next((u for u in view.users(lin.node) if is_add(u) and last_dim(u) == lin.out_features), None)
        if add is None:
            continue
        others = [o for o in view.add_operands(add) if o is not lin.node]
        if not others or any(numel(o) != numel(lin.node) for o in others):   # a bias, not a stream
            continue
        streams = set().union(*(inputs_of(o) for o in others))
        own = inputs_of(lin.input)
        if streams and own and not own & streams:
            out.append((lin, "dynamo split its residual branch across two graphs at a graph break (its readers "
                             "ran in an earlier graph), and a backend rewrites one graph at a time; left dense. "
                             "mohdify() captures the whole model and rewrites this branch; or remove the graph "
                             "break inside the branch"))
    return out
