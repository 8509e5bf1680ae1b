"""The graph view the analysis works on: op predicates, node helpers, and a networkx view of an FX graph.

IR level: any FX graph whose nodes carry shapes (export: meta['val'], dynamo: meta['example_value']);
ATen targets (export) and torch-level targets (dynamo: functions and tensor methods) are both listed.

Dynamo graphs are not functional: `y.add_(f)` is a node with no users, and later code keeps using
`y`. `GraphView` reads such a graph as if it were functional: every use of `y` after an in-place op
on it is an edge from that op (`GraphView.arg` gives the version of an argument a node really
reads). The FX graph itself is never changed.
"""

from __future__ import annotations

from typing import Optional

import networkx as nx
import torch
from torch import fx

from .graph_names import join_name, module_path, node_value
from .targets import (
    ADD_METHODS,
    ADD_TARGETS,
    ALIAS_METHODS,
    ALIAS_TARGETS,
    DIV_METHODS,
    DIV_TARGETS,
    MUL_METHODS,
    MUL_TARGETS,
    SHAPE_FUNCTIONS,
    SHAPE_METHODS,
    SUB_METHODS,
    SUB_TARGETS,
    writes_first_arg,
)

__all__ = ["GraphView", "is_add", "is_sub", "innermost_module", "canonical", "numel", "last_dim", "op_name"]


def _is_call(n: fx.Node, functions: set, methods: set) -> bool:
    return (n.op == "call_function" and n.target in functions) or (n.op == "call_method" and n.target in methods)


def is_add(n: fx.Node) -> bool:
    """An add of two tensors (h + f, torch.add, h.add(f), h.add_(f, alpha=...), +=)."""
    return _is_call(n, ADD_TARGETS, ADD_METHODS) and len(n.args) >= 2 and \
        isinstance(n.args[0], fx.Node) and isinstance(n.args[1], fx.Node)


def is_sub(n: fx.Node) -> bool:
    return _is_call(n, SUB_TARGETS, SUB_METHODS)


def is_mul(n: fx.Node) -> bool:
    return _is_call(n, MUL_TARGETS, MUL_METHODS)


def is_div(n: fx.Node) -> bool:
    return _is_call(n, DIV_TARGETS, DIV_METHODS)


def is_alias(n: fx.Node) -> bool:
    return _is_call(n, ALIAS_TARGETS, ALIAS_METHODS)


def is_shape_only(n: fx.Node) -> bool:
    return _is_call(n, SHAPE_FUNCTIONS, SHAPE_METHODS)


def innermost_module(node: fx.Node, prefix: str = "") -> tuple[str, str]:
    """(qualified name, class name) of the innermost module a node was traced in; ("", "") if none."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    return join_name(prefix, module_path(path)), cls_name(cls)


def cls_name(cls) -> str:
    return cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]


def canonical(node: fx.Node) -> fx.Node:
    """The node whose value `node` merely passes on (through same-shape casts, aliases, copies)."""
    while True:
        src = node.args[0] if node.args else None
        if not is_alias(node) or not isinstance(src, fx.Node):
            return node
        a, b = node_value(node), node_value(src)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return node
        node = src


def numel(node) -> Optional[int]:
    val = node_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return int(val.numel())
    except (TypeError, RuntimeError):   # symbolic sizes
        return None


def last_dim(node) -> Optional[int]:
    val = node_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    try:
        return int(val.shape[-1])
    except (TypeError, RuntimeError):
        return None


def op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", None) or str(t)


class GraphView:
    """networkx view of an FX graph, read as functional (see the module docstring), with cached
    ancestor sets."""

    def __init__(self, graph: fx.Graph):
        self.g = nx.DiGraph()
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self._args: dict[fx.Node, dict[fx.Node, fx.Node]] = {}
        latest: dict[fx.Node, fx.Node] = {}
        for n in graph.nodes:
            self.g.add_node(n)
            resolved = {}
            for inp in n.all_input_nodes:
                src = latest.get(inp, inp)
                resolved[inp] = src
                self.g.add_edge(src, n)
            self._args[n] = resolved
            if writes_first_arg(n) and n.args and isinstance(n.args[0], fx.Node):
                base = n.args[0]
                latest[base] = n
                root = resolved.get(base, base)
                if root is not base:
                    latest[root] = n
        self._anc: dict[fx.Node, set] = {}

    def ancestors(self, n: fx.Node) -> set:
        if n not in self._anc:
            self._anc[n] = nx.ancestors(self.g, n)
        return self._anc[n]

    def users(self, n: fx.Node) -> list[fx.Node]:
        return sorted(self.g.successors(n), key=self.order.get)

    def inputs(self, n: fx.Node) -> list[fx.Node]:
        return [self._args[n].get(i, i) for i in n.all_input_nodes]

    def arg(self, n: fx.Node, i: int):
        """n.args[i], as the version of that value n really reads (after in-place ops)."""
        a = n.args[i] if i < len(n.args) else None
        return self._args[n].get(a, a) if isinstance(a, fx.Node) else a

    def add_operands(self, n: fx.Node) -> list[fx.Node]:
        return [self.arg(n, 0), self.arg(n, 1)]
