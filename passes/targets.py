"""The call targets the passes recognise, in one place: the MoHD ops (for the backend, the fusion
pass and the names `mohdify.graph()` gives their nodes), the ATen and torch-level ops the analysis
reads (linear maps, weight views, adds, value-preserving and shape-only ops) in export and dynamo
graphs, the linear calls the backend's rewrite replaces, the ops fusion looks through, and the one
rule of what writes in place (`writes_first_arg` for the analysis, `mutates` for fusion).

A new residual form (a new way to add, scale or reshape the stream) is an entry in these tables,
the analysis that reads it (analyze.py) and its tests."""

from __future__ import annotations

import inspect
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx
from torch._ops import OpOverload, OpOverloadPacket

import mohdify.codegen  # noqa: F401 - registers torch.ops.mohdify.*

__all__ = ["MOHD_OPS", "LINEAR_FNS", "ADDMM_FNS", "MATMUL_FNS", "MATMUL_METHODS", "mohd_op_kind", "mohd_op_nodes",
           "LINEAR_TARGETS",
           "LINEAR_METHODS", "EINSUM_TARGETS", "ADD_TARGETS", "ADD_METHODS", "SUB_TARGETS", "SUB_METHODS",
           "ALIAS_TARGETS", "ALIAS_METHODS", "MUL_TARGETS", "MUL_METHODS", "DIV_TARGETS", "DIV_METHODS",
           "PASS_FUNCTIONS", "PASS_METHODS", "SHAPE_FUNCTIONS", "SHAPE_METHODS", "FIXED_ORDER_LINEARS", "WEIGHT_STEPS",
           "WEIGHT_VIEWS", "PLAIN_ADD_TARGETS", "PLAIN_ADD_METHODS", "RESHAPE_METHODS", "INPLACE_OPERATORS",
           "target_name", "writes_first_arg", "mutates"]

# kind -> op packet; a graph may call the packet or its .default overload
MOHD_OPS = {
    "route": torch.ops.mohdify.route,
    "read": torch.ops.mohdify.read,
    "read_multi": torch.ops.mohdify.read_multi,
    "write": torch.ops.mohdify.write,
    "write_add": torch.ops.mohdify.write_add,
}
# the native many-token routing (codegen/cpu/routing.py) is a branch's route too
_ROUTE_GATES = torch.ops.mohdify.route_gates
_KINDS = {**{packet: kind for kind, packet in MOHD_OPS.items()},
          **{packet.default: kind for kind, packet in MOHD_OPS.items()},
          _ROUTE_GATES: "route", _ROUTE_GATES.default: "route"}

# the linear calls the backend's rewrite replaces (dynamo graphs)
LINEAR_FNS = (torch._C._nn.linear, F.linear)    # (input, weight, bias), weight [O, I]
ADDMM_FNS = (torch.addmm,)                      # (bias, input, weight), weight [I, O]
MATMUL_FNS = (operator.matmul, torch.matmul, torch.mm)   # (input, weight), weight [I, O] (e.g. W.T)
MATMUL_METHODS = ("matmul", "__matmul__", "mm")
# linear calls whose weight operand is always the weight (a product of these is never W @ x)
FIXED_ORDER_LINEARS = (torch.ops.aten.linear.default, torch._C._nn.linear, F.linear, torch.ops.aten.addmm.default,
                       torch.addmm)
WEIGHT_STEPS = 8   # ops between a parameter and the weight operand: t, transpose, permute, slice, view
# Ops (by base name) that take a view, a slice or a copy of a weight (a stacked weight's select/index included).
WEIGHT_VIEWS = {"t", "T", "mT", "numpy_T", "transpose", "permute", "getitem", "select", "slice", "index",
                "view", "reshape", "_unsafe_view", "contiguous", "to", "_to_copy", "alias", "detach", "clone",
                "expand", "unsqueeze", "squeeze", "lift_fresh_copy", "getattr", "type_as", "type", "float", "half",
                "bfloat16", "double"}

aten = torch.ops.aten
LINEAR_TARGETS = {
    aten.linear.default: (0, 1), aten.addmm.default: (1, 2), aten.mm.default: (0, 1), aten.matmul.default: (0, 1),
    aten.bmm.default: (0, 1),
    torch._C._nn.linear: (0, 1), torch.nn.functional.linear: (0, 1), torch.addmm: (1, 2), torch.mm: (0, 1),
    torch.matmul: (0, 1), operator.matmul: (0, 1),
}  # target -> (index of the input arg, index of the weight arg)
LINEAR_METHODS = {"matmul": (0, 1), "__matmul__": (0, 1), "mm": (0, 1)}
EINSUM_TARGETS = {aten.einsum.default, torch.einsum, torch.functional.einsum}
ADD_TARGETS = {aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
SUB_TARGETS = {aten.sub.Tensor, aten.sub_.Tensor, operator.sub, operator.isub, torch.sub}
SUB_METHODS = {"sub", "sub_", "__sub__", "__isub__"}
# Ops that return their input unchanged in value (casts, aliases, copies).
ALIAS_TARGETS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
                 aten.clone.default, aten.contiguous.default, aten.detach.default, aten.type_as.default}
ALIAS_METHODS = {"to", "type", "contiguous", "clone", "detach", "float", "type_as", "half", "bfloat16", "double"}
MUL_TARGETS = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, operator.mul, operator.imul, torch.mul}
MUL_METHODS = {"mul", "mul_", "__mul__", "__rmul__"}
DIV_TARGETS = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, operator.truediv, operator.itruediv, torch.div}
DIV_METHODS = {"div", "div_", "__truediv__"}
# Zero-preserving ops whose first argument carries the value (see analyze.py).
PASS_FUNCTIONS = ALIAS_TARGETS | MUL_TARGETS | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.t.default, aten.numpy_T.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.flatten.using_ints, aten.expand.default, aten.dropout.default,
    aten.lift_fresh_copy.default, aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default,
    aten.neg.default, aten.rms_norm.default,
    torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unsqueeze, torch.squeeze, torch.dropout,
    F.dropout, F.relu, F.gelu, F.silu, F.rms_norm, torch.rms_norm, torch.relu, torch.tanh, torch.neg, operator.neg,
    torch.nn.functional.dropout1d, torch.nn.functional.dropout2d, torch.nn.functional.alpha_dropout,
}
PASS_METHODS = ALIAS_METHODS | MUL_METHODS | {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze",
                                              "flatten", "expand", "relu", "tanh", "neg"}
# Shape-only ops (used to split a residual update into its summands).
SHAPE_FUNCTIONS = PASS_FUNCTIONS - MUL_TARGETS - {F.rms_norm, torch.rms_norm, aten.rms_norm.default,
                                                  F.relu, F.gelu, F.silu,
                                                  torch.relu, torch.tanh, torch.neg, operator.neg}
SHAPE_METHODS = PASS_METHODS - MUL_METHODS - {"relu", "tanh", "neg"}


# fusion: the adds a write + residual add is fused with, and the methods it looks through between
# them (the same values, row-major, in another shape; not the casts SHAPE_METHODS allows)
PLAIN_ADD_TARGETS = {operator.add, torch.add}
PLAIN_ADD_METHODS = {"add"}
RESHAPE_METHODS = {"view", "reshape", "contiguous"}

# Python operators that write into their first operand
INPLACE_OPERATORS = {operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
                     operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
                     operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift}


def target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _inplace_name(name: str) -> bool:
    """torch's naming rule: `add_`, `mul_` write into self; dunders (`__add__`) do not, `__iadd__` does."""
    return (name.endswith("_") and not name.endswith("__")) or (name.startswith("__i") and name.endswith("__")) \
        or name == "__setitem__"


def writes_first_arg(node: fx.Node) -> bool:
    """Whether a node writes into its first argument (y.add_(f), y += f, aten.add_.Tensor)."""
    if node.op == "call_method":
        return isinstance(node.target, str) and _inplace_name(node.target)
    if node.op != "call_function":
        return False
    if node.target in INPLACE_OPERATORS:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and bool(schema.arguments) and schema.arguments[0].alias_info is not None \
        and schema.arguments[0].alias_info.is_write


def mutates(node: fx.Node) -> bool:
    """Whether a node may write into any tensor: in place on its first argument, a mutable op schema,
    out=, inplace=True, or an unknown module call."""
    if node.op == "call_module" or writes_first_arg(node):
        return True
    if node.op != "call_function":
        return False
    t = node.target
    if isinstance(t, OpOverload):
        return t._schema.is_mutable
    if isinstance(t, OpOverloadPacket):
        return any(getattr(t, o)._schema.is_mutable for o in t.overloads())
    return node.kwargs.get("out") is not None or _inplace_name(target_name(node)) or _binds_inplace(node)


def _binds_inplace(node: fx.Node) -> bool:
    """Whether a call with an `inplace` parameter (F.relu, F.dropout, ...) is given inplace=True."""
    try:
        sig = inspect.signature(node.target)
    except (TypeError, ValueError):
        return False
    if "inplace" not in sig.parameters:
        return False
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return True   # cannot tell: assume it mutates
    return bool(bound.arguments.get("inplace", False))


def mohd_op_kind(target) -> Optional[str]:
    """"route", "read", "read_multi", "write" or "write_add" for a MoHD op target, else None."""
    try:
        return _KINDS.get(target)
    except TypeError:   # unhashable targets are no MoHD op
        return None


def mohd_op_nodes(graph: fx.Graph, kinds: tuple[str, ...] = ("route", "read", "write")) -> list[fx.Node]:
    """The calls of MoHD ops of the given kinds in a graph (a mohdified model's graph has them)."""
    return [n for n in graph.nodes if n.op == "call_function" and mohd_op_kind(n.target) in kinds]
