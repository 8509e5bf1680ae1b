"""Layers: what the passes know of a model's modules, read from the model or from a dynamo graph.

`mohdify()` and `explain()` have the model; the backend has only the graph dynamo hands it, whose
placeholders hold the real parameters (`meta['grapharg']`) and whose nodes name the module they ran
in and its class (`meta['nn_module_stack']`). Both build one `LayerTable`, so the resolver
(resolve.py) and the choice of branches (select.py) read the same facts either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from torch import fx, nn

from .graph_names import join_name, module_path
from .targets import LINEAR_FNS

__all__ = ["LayerTable", "is_linear_layer", "linear_features"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_linear_layer(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or a GPT-2 style Conv1D (weight [in, out], addmm)."""
    weight = getattr(module, "weight", None)
    return _is_linear_class(type(module), weight)


def _is_linear_class(cls, weight) -> bool:
    if isinstance(cls, type) and issubclass(cls, nn.Linear):
        return isinstance(weight, nn.Parameter)
    return _class_name(cls) == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape
    return int(in_f), int(out_f)


def _class_name(cls) -> str:
    return cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]


@dataclass
class LayerTable:
    """The modules the passes ask about, by qualified name."""

    params: dict[str, nn.Parameter] = field(default_factory=dict)     # qualified name -> parameter
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # linear layer -> (in, out) features
    classes: dict[str, str] = field(default_factory=dict)             # module -> class name
    containers: set[str] = field(default_factory=set)                 # nn.Sequential / ModuleList / ModuleDict

    def weight(self, fqn: str) -> Optional[nn.Parameter]:
        return self.params.get(join_name(fqn, "weight"))

    def holder(self, name: str) -> str:
        """The closest module at or above `name` that is not a container: a branch is named after it,
        and its router lives there, where no container calls it."""
        while name and name in self.containers:
            name = name.rpartition(".")[0]
        return name

    @classmethod
    def of_model(cls, model: nn.Module) -> LayerTable:
        table = cls()
        for name, module in model.named_modules():
            table.classes[name] = type(module).__name__
            if isinstance(module, _CONTAINERS):
                table.containers.add(name)
            if is_linear_layer(module):
                table.linears[name] = linear_features(module)
            for attr, p in module.named_parameters(recurse=False):
                table.params[join_name(name, attr)] = p
        return table

    @classmethod
    def of_dynamo_graph(cls, gm: fx.GraphModule) -> tuple[LayerTable, dict[str, str]]:
        """The table of a dynamo graph, and its placeholder name -> parameter qualified name map."""
        table, holders = cls(), {}
        for node in gm.graph.nodes:
            param = _parameter(node, gm)
            if param is not None:
                holders[node.name] = _param_name(node)
                table.params[holders[node.name]] = param
        kinds: dict[str, type] = {}
        for node in gm.graph.nodes:
            for path, kind in (node.meta.get("nn_module_stack") or {}).values():
                kinds.setdefault(module_path(path), kind)
            _tied_weight(node, table, holders)
        for name, kind in kinds.items():
            table.classes[name] = _class_name(kind)
            if isinstance(kind, type) and issubclass(kind, _CONTAINERS):
                table.containers.add(name)
            weight = table.weight(name)
            if _is_linear_class(kind, weight) and weight.dim() == 2:
                out_f, in_f = weight.shape if isinstance(kind, type) and issubclass(kind, nn.Linear) \
                    else weight.shape[::-1]
                table.linears[name] = (int(in_f), int(out_f))
        return table, holders


def _tied_weight(node: fx.Node, table: LayerTable, holders: dict[str, str]) -> None:
    """A layer whose weight dynamo lifted under another name (a head tied to the embedding) gets it
    under its own name too, as `model.named_modules()` shows it: F.linear(x, W) in an nn.Linear."""
    stack = node.meta.get("nn_module_stack")
    if node.op != "call_function" or node.target not in LINEAR_FNS or len(node.args) < 2 or not stack:
        return
    path, kind = list(stack.values())[-1]
    w = node.args[1]
    if isinstance(kind, type) and issubclass(kind, nn.Linear) and isinstance(w, fx.Node) and w.name in holders:
        table.params.setdefault(join_name(module_path(path), "weight"), table.params[holders[w.name]])


def _parameter(node: fx.Node, gm: fx.GraphModule) -> Optional[nn.Parameter]:
    """The real Parameter behind a lifted-parameter placeholder or a get_attr node, else None."""
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
    """A dynamo parameter's qualified name, from its source ("L['self'].fc._parameters['weight']")."""
    if node.op == "get_attr":
        return str(node.target)
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name    # a method in older torch, a property in 2.13
    path = module_path(name) if isinstance(name, str) else node.name
    return re.sub(r"(^|\.)_parameters\.", r"\1", path)   # L['self']._parameters['w'] -> w
