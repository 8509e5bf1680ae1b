"""Capture front-end of last resort: record the ATen ops of one eager forward on the example inputs.

IR level: ATen (post-autograd: `F.linear` appears as `t` + `addmm`/`mm`, as GPT-2's Conv1D does).
Where it is used: after `torch.export`, dynamo and per-block export have failed, or when they leave
frames unseen (a data-dependent Python `if` inside a block: export refuses it, dynamo runs that frame
eagerly). The model runs for real under a `TorchDispatchMode` that appends every op it dispatches to
an FX graph, so Python control flow simply takes the path the example inputs' values choose; module
forward hooks give each node its `nn_module_stack` (qualified names). Parameters and buffers become
placeholders (`CapturedGraph.params` names the parameters); node values are meta tensors of the real
outputs' shapes and dtypes.

What holds after it: one graph of the path the example inputs took. A branch the inputs skip (an
`if` that is false for them) is not in it, like any layer that never ran.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .captured import CapturedGraph

__all__ = ["FRONTEND", "capture_real"]

FRONTEND = "real-value trace"


class _Recorder(TorchDispatchMode):
    """Appends each dispatched op to `graph`, its tensor arguments mapped to the nodes that made them."""

    def __init__(self, graph: fx.Graph, nodes: dict[int, fx.Node], stack: list[tuple[str, str]]):
        super().__init__()
        self.graph, self.nodes, self.stack = graph, nodes, stack
        self.keep: list[torch.Tensor] = []     # tensors whose ids are keys of `nodes` stay alive
        self.count = itertools.count()
        self.paused = False

    def node_of(self, t: torch.Tensor) -> fx.Node:
        node = self.nodes.get(id(t))
        if node is None:   # a tensor made outside the recorded ops (a constant): a placeholder of its own
            node = self.graph.placeholder(f"const_{next(self.count)}")
            node.meta["val"] = _meta(t)
            self.bind(t, node)
        return node

    def bind(self, t: torch.Tensor, node: fx.Node) -> None:
        self.nodes[id(t)] = node
        self.keep.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            self.record(func, args, kwargs, out)
        return out

    def record(self, func, args, kwargs, out) -> None:
        as_node = lambda v: self.node_of(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        node = self.graph.call_function(func, pytree.tree_map(as_node, args), pytree.tree_map(as_node, kwargs))
        node.meta["val"] = pytree.tree_map(lambda v: _meta(v) if isinstance(v, torch.Tensor) else v, out)
        if self.stack:
            node.meta["nn_module_stack"] = {name: (name, cls) for name, cls in self.stack}
        if isinstance(out, torch.Tensor):
            self.bind(out, node)
        elif isinstance(out, (tuple, list)):
            for i, v in enumerate(out):
                if isinstance(v, torch.Tensor):
                    item = self.graph.call_function(_getitem, (node, i))
                    item.meta.update(val=_meta(v), nn_module_stack=node.meta.get("nn_module_stack", {}))
                    self.bind(v, item)


class _Linears(TorchFunctionMode):
    """Records `F.linear` as one `aten.linear` node (as torch.export shows it), not the `t` + `addmm`
    it decomposes into below autograd, so the readers' input is the tensor the layer received."""

    LINEAR = (torch.nn.functional.linear, torch._C._nn.linear)

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.LINEAR or self.recorder.paused:
            return func(*args, **kwargs)
        self.recorder.paused = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.recorder.paused = False
        self.recorder.record(torch.ops.aten.linear.default, args, kwargs, out)
        return out


def _getitem(seq, i):
    return seq[i]


_getitem.__name__ = "getitem"


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def capture_real(model: nn.Module, args: tuple, kwargs: dict) -> CapturedGraph:
    """One ATen graph of `model(*args, **kwargs)` as it runs on these values (see the module doc)."""
    graph = fx.Graph()
    nodes: dict[int, fx.Node] = {}
    params: dict[str, str] = {}
    for fqn, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        name = "p_" + fqn.replace(".", "_")
        node = graph.placeholder(name)
        node.meta["val"] = _meta(tensor)
        nodes[id(tensor)] = node
        if isinstance(tensor, nn.Parameter):
            params[name] = fqn
    stack: list[tuple[str, str]] = []
    names = {id(m): n for n, m in model.named_modules()}

    def enter(module, inputs):
        if id(module) in names and names[id(module)]:
            stack.append((names[id(module)], f"{type(module).__module__}.{type(module).__qualname__}"))

    def leave(module, inputs, output):
        if id(module) in names and names[id(module)] and stack:
            stack.pop()
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    recorder = _Recorder(graph, nodes, stack)
    try:
        for i, t in enumerate(x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)):
            if id(t) not in nodes:
                node = graph.placeholder(f"input_{i}")
                node.meta["val"] = _meta(t)
                recorder.bind(t, node)
        with torch.no_grad(), recorder, _Linears(recorder):
            out = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    leaves = [recorder.node_of(t) for t in pytree.tree_leaves(_plain(out)) if isinstance(t, torch.Tensor)]
    graph.output(tuple(leaves))
    return CapturedGraph(graph, FRONTEND, "", params)


def _plain(out: Any) -> Any:
    """Model outputs as pytree-friendly values (HF ModelOutput is a dict)."""
    return dict(out) if isinstance(out, dict) else out
