"""Rewrite: a dense model's dynamo graph -> the same graph with magnitude-routed MoHD ops.

Used by `torch.compile(model, backend="mohd")` (mohdify/backend.py) on graphs of dense models.

IR level: the torch-level FX graph dynamo hands a backend, before AOT autograd. Parameters are
lifted to placeholders (dynamo's `grapharg` meta holds the real `nn.Parameter`), nodes carry fake
tensors in `meta['example_value']` and the module they ran in in `meta['nn_module_stack']`.

Pattern: the residual branches of `passes.analyze.analyze_graph`, where a linear layer is a call
    F.linear(x, W, b) / torch._C._nn.linear(x, W, b)    W: [O, I], or
    torch.addmm(b, x, W)                                  W: [I, O] (GPT-2 Conv1D)
whose W is a parameter placeholder (or get_attr). Each branch (readers R_j, writer W_o) becomes
    x2      = x.reshape(-1, D)                            once per distinct reader input x
    routing = route_tokens(x2, None, shared, routed, k, scaling, density)   (mask, scale, gates, _)
    R_j:  mohdify.read(x2, W_j, b_j, routing.mask, routing.scale), viewed back to [..., O_j]
    W_o:  mohdify.write(u.reshape(-1, I), W_o, b_o, routing.gates, None), viewed back to [..., D]
where the writer takes the routing of the input of the last reader that runs before it (what the
eager MoHDWriter takes from its branch). `route_tokens` is the function MoHDBranch.route calls:
the branch math is written once (mohdify/routing.py).

Preconditions: config.router == "magnitude" and config.fusion == "none" (a graph rewrite cannot add
parameters); num_groups divides the hidden size D (else ConfigError).
Left dense, with the reason in the report: branches whose writer writes a different number of
tokens than its readers read, and branches that share a reader with a branch rewritten before.
Afterwards: the graph lints and computes what the model mohdified eagerly with
MoHDConfig(router="magnitude", same groups/shared/top_k/scaling) computes (at delta = 1, what the
dense model computes). New nodes carry example values and the module stack of the layer they
replace. Nothing outside the graph changes.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

import mohdify.codegen  # noqa: F401 - registers torch.ops.mohdify.*
from mohdify.config import MoHDConfig
from mohdify.routing import route_tokens

from .analyze import BranchMatch, LinearRef, analyze_graph, innermost_module
from .capture import module_path, node_value
from .find import common_parent, skip_reasons
from .targets import ADDMM_FNS, LINEAR_FNS

__all__ = ["RewriteReport", "GraphBuilder", "dynamo_resolver", "graph_fake_mode", "rewrite_graph", "unflatten_tokens"]



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


def _parameter(node: Any, gm: fx.GraphModule) -> Optional[nn.Parameter]:
    """The real Parameter behind a lifted-parameter placeholder or a get_attr node, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        example = getattr(node.meta.get("grapharg"), "example", None)
        return example if isinstance(example, nn.Parameter) else None
    if node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return value if isinstance(value, nn.Parameter) else None
    return None


def _param_name(node: fx.Node) -> str:
    """A name for a linear call outside any submodule: its weight's qualified name, less ".weight"."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name    # a method in older torch, a property in 2.13
    path = module_path(name) if isinstance(name, str) else str(node.target)
    path = re.sub(r"(^|\.)_parameters\.", r"\1", path)   # L['self']._parameters['w'] -> w
    return path[: -len(".weight")] if path.endswith(".weight") else path


def _linear_parts(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, Optional[fx.Node], bool]]:
    """(input, weight, bias, weight stored [I, O]) of a linear call, or None."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_FNS:
        args = list(node.args) + [None] * (3 - len(node.args))
        x = args[0] if args[0] is not None else node.kwargs.get("input")
        w = args[1] if args[1] is not None else node.kwargs.get("weight")
        b = args[2] if args[2] is not None else node.kwargs.get("bias")
        return (x, w, b, False) if isinstance(x, fx.Node) else None
    if node.target in ADDMM_FNS and len(node.args) == 3 and not node.kwargs:   # beta = alpha = 1
        b, x, w = node.args
        return (x, w, b, True) if isinstance(x, fx.Node) and isinstance(b, fx.Node) else None
    return None


def dynamo_resolver(gm: fx.GraphModule) -> Callable[[fx.Node], Optional[LinearRef]]:
    """Recognise linear-layer calls in a dynamo graph: a linear/addmm of a parameter weight."""
    def resolve(node: fx.Node) -> Optional[LinearRef]:
        parts = _linear_parts(node)
        if parts is None:
            return None
        x, w, b, transposed = parts
        weight = _parameter(w, gm)
        if weight is None or weight.dim() != 2:
            return None
        in_f, out_f = weight.shape if transposed else weight.shape[::-1]
        if transposed:   # addmm is a linear layer only with a [O] bias and a 2-D input
            bias_val, x_val = node_value(b), node_value(x)
            if not isinstance(bias_val, torch.Tensor) or tuple(bias_val.shape) != (out_f,) or x_val is None \
                    or x_val.dim() != 2:
                return None
        fqn, _ = innermost_module(node)
        if not fqn:
            fqn = _param_name(w)
        return LinearRef(node, x, fqn or node.name, int(in_f), int(out_f))
    return resolve


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


def _tokens_match(x: fx.Node, x_width: int, u: fx.Node, u_width: int) -> bool:
    """Whether the writer input u carries as many tokens as the reader input x (provably)."""
    xv, uv = node_value(x), node_value(u)
    if not isinstance(xv, torch.Tensor) or not isinstance(uv, torch.Tensor):
        return False
    return bool(statically_known_true(xv.numel() // x_width == uv.numel() // u_width))


def _route(b: GraphBuilder, x: fx.Node, hidden: int, config: MoHDConfig, before: fx.Node) -> tuple:
    """Insert the magnitude routing of branch input x before `before`: (x2, mask, scale, gates)."""
    val = node_value(x)
    with b.graph.inserting_before(before):
        x2 = b.node("call_method", "reshape", (x, -1, hidden), before)                      # [T, D]
        on_device = {"device": val.device}
        shared = b.node("call_function", torch.arange, (0, config.num_shared), before, on_device)  # [N_s]
        routed = b.node("call_function", torch.arange, (config.num_shared, config.num_groups), before,
                        on_device)                                                          # [N_r]
        routing = b.node("call_function", route_tokens, (x2, None, shared, routed, config.top_k, config.scaling,
                                                         config.density), before)
        mask, scale, gates = (b.node("call_function", operator.getitem, (routing, i), before) for i in range(3))
    return x2, mask, (scale if config.scaling != "none" else None), gates


def _replace_reader(b: GraphBuilder, ref: LinearRef, x2: fx.Node, mask: fx.Node, alpha: Optional[fx.Node]) -> None:
    x, w, bias, transposed = _linear_parts(ref.node)
    with b.graph.inserting_before(ref.node):
        weight = b.node("call_method", "t", (w,), ref.node) if transposed else w          # [O, D]
        y2 = b.node("call_function", torch.ops.mohdify.read.default, (x2, weight, bias, mask, alpha), ref.node)
        y = b.node("call_function", unflatten_tokens, (y2, x), ref.node)                  # [..., O]
    ref.node.replace_all_uses_with(y)
    b.graph.erase_node(ref.node)


def _replace_writer(b: GraphBuilder, ref: LinearRef, gates: fx.Node) -> None:
    u, w, bias, transposed = _linear_parts(ref.node)
    with b.graph.inserting_before(ref.node):
        u2 = b.node("call_method", "reshape", (u, -1, ref.in_features), ref.node)         # [T, I]
        weight = b.node("call_method", "t", (w,), ref.node) if transposed else w          # [D, I]
        o2 = b.node("call_function", torch.ops.mohdify.write.default, (u2, weight, bias, gates, None), ref.node)
        o = b.node("call_function", unflatten_tokens, (o2, u), ref.node)                  # [..., D]
    ref.node.replace_all_uses_with(o)
    b.graph.erase_node(ref.node)


def _rewrite_branch(b: GraphBuilder, m: BranchMatch, hidden: int, config: MoHDConfig, order: dict) -> None:
    readers = sorted(m.readers, key=lambda r: order[r.node])
    routed: dict[fx.Node, tuple] = {}
    for r in readers:
        if r.input not in routed:
            routed[r.input] = _route(b, r.input, hidden, config, r.node)
        x2, mask, scale, _ = routed[r.input]
        _replace_reader(b, r, x2, mask, scale)
    last = [r for r in readers if order[r.node] < order[m.writer.node]][-1]
    _replace_writer(b, m.writer, routed[last.input][3])


def graph_fake_mode(graph: fx.Graph):
    """The fake mode of the graph's example values (new nodes' values must come from the same one)."""
    from torch._subclasses.fake_tensor import FakeTensor
    for n in graph.nodes:
        val = n.meta.get("example_value")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def rewrite_graph(gm: fx.GraphModule, config: MoHDConfig) -> RewriteReport:
    """Rewrite every residual branch of a dense dynamo graph into magnitude-routed MoHD ops, in place.

    Raises ConfigError if config.num_groups does not divide the hidden size found.
    """
    analysis = analyze_graph(gm.graph, dynamo_resolver(gm))
    skipped = list(analysis.skipped) + sorted(skip_reasons(analysis).items())
    report = RewriteReport(analysis.hidden_size, skipped=skipped, linears=len(analysis.linears))
    if not analysis.branches:
        return report
    hidden = analysis.hidden_size
    config.check_hidden_size(hidden)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    builder = GraphBuilder(gm.graph, graph_fake_mode(gm.graph))
    claimed: set[fx.Node] = set()
    for m in sorted(analysis.branches, key=lambda m: order[m.writer.node]):
        names = [r.fqn for r in m.readers]
        nodes = {r.node for r in m.readers} | {m.writer.node}
        first_reader = min(order[r.node] for r in m.readers)
        if nodes & claimed:
            report.skipped.append((m.writer.fqn, "shares a linear layer with a branch rewritten before; left dense"))
            continue
        if first_reader > order[m.writer.node]:
            report.skipped.append((m.writer.fqn, "its writer runs before its readers; left dense"))
            continue
        if not all(_tokens_match(r.input, hidden, m.writer.input, m.writer.in_features) for r in m.readers):
            report.skipped.append((m.writer.fqn, "its writer writes a different number of tokens than its "
                                   "readers read; left dense"))
            continue
        claimed |= nodes
        _rewrite_branch(builder, m, hidden, config, order)
        report.branches.append((common_parent(names + [m.writer.fqn]), names, m.writer.fqn))
    gm.graph.lint()
    gm.recompile()
    return report
