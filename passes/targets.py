"""The call targets the passes recognise, in one place: the MoHD ops (for the backend, the fusion
pass and the names `mohdify.graph()` gives their nodes) and the torch-level linear calls of dynamo
graphs (for the backend's rewrite of dense graphs)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

import mohdify.codegen  # noqa: F401 - registers torch.ops.mohdify.*

__all__ = ["MOHD_OPS", "LINEAR_FNS", "ADDMM_FNS", "mohd_op_kind", "mohd_op_nodes"]

# kind -> op packet; a graph may call the packet or its .default overload
MOHD_OPS = {
    "route": torch.ops.mohdify.route,
    "read": torch.ops.mohdify.read,
    "read_multi": torch.ops.mohdify.read_multi,
    "write": torch.ops.mohdify.write,
    "write_add": torch.ops.mohdify.write_add,
}
_KINDS = {**{packet: kind for kind, packet in MOHD_OPS.items()},
          **{packet.default: kind for kind, packet in MOHD_OPS.items()}}

LINEAR_FNS = (torch._C._nn.linear, F.linear)    # (input, weight, bias), weight [O, I]
ADDMM_FNS = (torch.addmm,)                      # (bias, input, weight), weight [I, O]


def mohd_op_kind(target) -> Optional[str]:
    """"route", "read", "read_multi", "write" or "write_add" for a MoHD op target, else None."""
    try:
        return _KINDS.get(target)
    except TypeError:   # unhashable targets are no MoHD op
        return None


def mohd_op_nodes(graph: fx.Graph, kinds: tuple[str, ...] = ("route", "read", "write")) -> list[fx.Node]:
    """The calls of MoHD ops of the given kinds in a graph (a mohdified model's graph has them)."""
    return [n for n in graph.nodes if n.op == "call_function" and mohd_op_kind(n.target) in kinds]
