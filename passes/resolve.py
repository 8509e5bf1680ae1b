"""Resolve: recognise the linear maps of a captured graph (products of an activation with a 2-D weight).

A product traced inside a linear layer (nn.Linear and subclasses, GPT-2 style Conv1D) with that
layer's own weight is a layer call; any other product with a 2-D weight parameter (x @ W.T in a
parent module, einsum, F.linear on a slice, W @ x, a bare nn.Parameter) is a weight product, which
the analysis finds too so that the plan can say truly why it stays dense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import fx

from .analyze import LinearRef
from .graph_names import node_value
from .graphview import innermost_module
from .layers import LayerTable
from .targets import (
    EINSUM_TARGETS,
    FIXED_ORDER_LINEARS,
    LINEAR_METHODS,
    LINEAR_TARGETS,
    WEIGHT_STEPS,
    WEIGHT_VIEWS,
)

__all__ = ["module_resolver", "weight_source"]


def _base_name(n: fx.Node) -> str:
    t = n.target
    return (t if isinstance(t, str) else getattr(t, "__name__", str(t))).split(".")[0]


def weight_source(w, limit: int = WEIGHT_STEPS):
    """The placeholder or get_attr node a weight operand views (through t, slices, ...), or None."""
    for _ in range(limit):
        if not isinstance(w, fx.Node):
            return None
        if w.op in ("placeholder", "get_attr"):
            return w
        if w.op not in ("call_function", "call_method") or not w.args or _base_name(w) not in WEIGHT_VIEWS:
            return None
        w = w.args[0]
    return None


def _weight_param(w, params: dict[str, str]) -> Optional[str]:
    """The qualified name of the parameter a weight operand is (through transposes, slices, views)."""
    w = weight_source(w)
    if w is None:
        return None
    return params.get(w.name) or (str(w.target) if w.op == "get_attr" else None)


def _operands(node: fx.Node, is_param: Callable[[Any], bool]) -> Optional[tuple[fx.Node, fx.Node]]:
    """(input, weight) of a linear/addmm/mm/matmul/einsum node whose weight is a parameter, else None."""
    if node.op == "call_function" and node.target in LINEAR_TARGETS:
        in_idx, w_idx = LINEAR_TARGETS[node.target]
        args = node.args
    elif node.op == "call_method" and node.target in LINEAR_METHODS:
        (in_idx, w_idx), args = LINEAR_METHODS[node.target], node.args
    elif node.op == "call_function" and node.target in EINSUM_TARGETS:
        ops = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if len(ops) != 2:
            return None
        in_idx, w_idx, args = (0, 1, ops) if is_param(ops[1]) else (1, 0, ops)
    else:
        return None
    if len(args) <= max(in_idx, w_idx) or not isinstance(args[in_idx], fx.Node):
        return None
    if not is_param(args[w_idx]):
        if node.target in FIXED_ORDER_LINEARS or not is_param(args[in_idx]) or not isinstance(args[w_idx], fx.Node):
            return None
        return args[w_idx], args[in_idx]   # W @ x (Mamba's dt_proj.weight @ time_step)
    return args[in_idx], args[w_idx]


def module_resolver(table: LayerTable, prefix: str,
                    params: Optional[dict[str, str]] = None) -> Callable[[fx.Node], Optional[LinearRef]]:
    """Recognise the linear maps of a graph: products of an activation with a 2-D weight parameter.

    `params` maps placeholder names to parameters' qualified names (CapturedGraph.params). A product
    traced inside a linear layer with that layer's own weight is a layer call (`LinearRef.layer`);
    any other (x @ W.T in a parent module, einsum, F.linear on a slice, a bare nn.Parameter) is a
    weight product, found so that the plan can say why it stays dense. Stacked (3-D) expert weights
    are not linear maps here (see `_weight_products`).
    """
    params = params or {}
    named = table.params

    def is_param(w) -> bool:
        name = _weight_param(w, params)
        return name is not None and name in named and named[name].dim() == 2

    def resolve(node: fx.Node) -> Optional[LinearRef]:
        ops = _operands(node, is_param)
        if ops is None:
            return None
        x, w = ops
        xv, wv, yv = node_value(x), node_value(w), node_value(node)
        if not all(isinstance(v, torch.Tensor) for v in (xv, wv, yv)) or wv.dim() != 2 or xv.dim() == 0:
            return None
        in_f, out_f = int(xv.shape[-1]), int(yv.shape[-1])
        left = node.args and node.args[0] is w and node.target not in FIXED_ORDER_LINEARS   # W @ x
        if left:
            out_f, in_f = int(wv.shape[0]), int(wv.shape[1])
        elif sorted((in_f, out_f)) != sorted(int(d) for d in wv.shape):
            return None
        pname = _weight_param(w, params)
        owner, _, attr = pname.rpartition(".")
        param = named[pname]
        here, _ = innermost_module(node, prefix)
        if here in table.linears and table.weight(here) is param and not left:   # tied too
            stored = tuple(param.shape)
            if tuple(wv.shape) in (stored, stored[::-1]) and (in_f, out_f) == table.linears[here]:
                return LinearRef(node, x, here, in_f, out_f)
        if owner in table.linears and attr == "weight":
            return LinearRef(node, x, owner, in_f, out_f, layer=False, where=here or "the model's own forward")
        return LinearRef(node, x, owner or pname, in_f, out_f, layer=False, where=pname)
    return resolve

