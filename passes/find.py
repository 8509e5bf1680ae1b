"""Find: capture a model, analyse every captured graph, and merge the results into a Plan.

Linear layers are recognised by their module (nn.Linear and its subclasses, and GPT-2 style
Conv1D whose weight is stored [in, out]); the output head and embeddings are never readers or
writers (they feed no residual branch). Every linear layer of the model that the plan leaves
dense is listed in `plan.skipped` with the reason, and so is every module that multiplies
activations by its own parameter without being a linear layer (MoE routers, stacked experts).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from mohdify.config import MoHDConfig
from mohdify.errors import UnsupportedModelError
from mohdify.plan import Branch, Plan

from .analyze import LINEAR_TARGETS, GraphAnalysis, LinearRef, analyze_graph, innermost_module
from .capture import capture, node_value

__all__ = ["is_linear_layer", "linear_features", "find_plan", "module_resolver", "NOT_CAPTURED"]

NOT_CAPTURED = ("in no captured graph: not called in the forward pass, or run outside the captured graphs "
                "(e.g. eagerly after a dynamo graph break, or outside the blocks captured one by one)")


def is_linear_layer(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or a GPT-2 style Conv1D (weight [in, out], addmm)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape
    return int(in_f), int(out_f)


def module_resolver(modules: dict[str, nn.Module], prefix: str) -> Callable[[fx.Node], Optional[LinearRef]]:
    """Recognise calls of the model's linear layers in a graph.

    A call is a linear/addmm/mm/matmul traced inside a linear layer whose weight operand has the
    layer's weight shape, or its transpose for nn.Linear subclasses that compute `x @ W.T` (Falcon).
    """
    def resolve(node: fx.Node) -> Optional[LinearRef]:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            return None
        fqn, _ = innermost_module(node, prefix)
        module = modules.get(fqn)
        if module is None or not is_linear_layer(module):
            return None
        in_idx, w_idx = LINEAR_TARGETS[node.target]
        if len(node.args) <= max(in_idx, w_idx) or not isinstance(node.args[in_idx], fx.Node):
            return None
        weight = node.args[w_idx]
        val = node_value(weight) if isinstance(weight, fx.Node) else None
        x = node_value(node.args[in_idx])
        if val is None or x is None or x.dim() == 0:
            return None
        in_f, out_f = linear_features(module)
        shape, stored = tuple(val.shape), tuple(module.weight.shape)
        is_linear_call = node.target in (torch.ops.aten.linear.default, torch._C._nn.linear, F.linear)
        if shape == stored and (is_linear_call or not isinstance(module, nn.Linear) or in_f == out_f):
            pass   # F.linear(x, W), Conv1D's addmm(b, x, W), or a square weight either way
        elif not (shape == stored[::-1] and isinstance(module, nn.Linear) and not is_linear_call):
            return None   # a matmul inside the module that is not its weight product
        if int(x.shape[-1]) != in_f:
            return None
        return LinearRef(node, node.args[in_idx], fqn, in_f, out_f)
    return resolve


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if common == parts[0] and len(names) == 1:
        common = common[:-1]
    return ".".join(common)


def _skip_reasons(analysis: GraphAnalysis) -> dict[str, str]:
    """Why each linear layer of a graph that is not a reader or writer stays dense."""
    used = {r.fqn for b in analysis.branches for r in b.readers} | {b.writer.fqn for b in analysis.branches}
    writers = {b.writer.node for b in analysis.branches}
    adds = {b.add for b in analysis.branches}
    linear_nodes = {lin.node for lin in analysis.linears}
    hidden = analysis.hidden_size
    reasons = {}
    for lin in analysis.linears:
        if lin.fqn in used or lin.fqn in reasons:
            continue
        if lin.in_features != hidden:
            reasons[lin.fqn] = (f"inner layer (in_features={lin.in_features}, out_features={lin.out_features}, "
                                f"hidden size {hidden}): neither a reader nor a writer")
            continue
        reached = _reach(lin.node, linear_nodes, writers | adds)
        if reached & writers:
            reasons[lin.fqn] = ("reads a stream other than its branch's input (e.g. cross-attention k/v "
                                "reading the encoder output); left dense")
        elif reached & adds:
            reasons[lin.fqn] = ("reads the branch input but only gates or routes the branch's output (e.g. an "
                                "MoE shared-expert gate or router); it is not part of a reader/writer pair; left dense")
        else:
            reasons[lin.fqn] = ("reads the residual stream but feeds no residual branch "
                                "(output head, pooler, classifier or a router); never rewritten")
    return reasons


def _reach(start: fx.Node, linear_nodes: set, targets: set, limit: int = 2000) -> set:
    """The nodes of `targets` reached from `start` without passing through another linear layer."""
    seen, todo, hit = {start}, list(start.users), set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in targets:
            hit.add(n)
            continue
        if n not in linear_nodes:
            todo.extend(n.users)
    return hit


def _weight_products(graph, resolve, params: dict[str, str], modules: dict[str, nn.Module]) -> dict[str, str]:
    """Modules that multiply activations by their own 2-D parameter but are not linear layers
    (MoE routers, stacked expert weights, a tied embedding used as the head): left dense, said why."""
    out = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS or resolve(node) is not None:
            continue
        w = node.args[LINEAR_TARGETS[node.target][1]] if len(node.args) > 1 else None
        seen = 0
        while isinstance(w, fx.Node) and w.op == "call_function" and w.args and seen < 8:
            w, seen = w.args[0], seen + 1   # through t / transpose / select / index of stacked weights
        if not isinstance(w, fx.Node) or w.name not in params:
            continue
        owner, _, attr = params[w.name].rpartition(".")
        module = modules.get(owner)
        if module is None or is_linear_layer(module):
            continue
        out.setdefault(owner, f"{type(module).__name__} multiplies activations by its parameter {attr!r} but is "
                              "not an nn.Linear (an MoE router, stacked MoE expert weights or a tied embedding "
                              "head); left dense")
    return out


def _unrecognised_calls(graphs, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Linear layers that appear in a graph but whose weight product the analysis does not recognise."""
    out = {}
    for g in graphs:
        for node in g.graph.nodes:
            fqn, _ = innermost_module(node, g.prefix)
            if fqn in modules and is_linear_layer(modules[fqn]):
                out.setdefault(fqn, "called, but not as a weight product the analysis recognises "
                                    "(F.linear, addmm, mm or matmul by its weight); left dense")
    return out


def find_plan(model: nn.Module, example_inputs: Any, config: Optional[MoHDConfig] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> Plan:
    """Capture and analyse `model`; return the Plan. Changes nothing."""
    config = config or MoHDConfig()
    cap = capture(model, example_inputs)
    modules = dict(model.named_modules())
    resolvers = [module_resolver(modules, g.prefix) for g in cap.graphs]
    analyses = [analyze_graph(g.graph, r, g.prefix) for g, r in zip(cap.graphs, resolvers)]
    hiddens = [a.hidden_size for a in analyses if a.hidden_size]
    if not hiddens:
        found = sum(len(a.linears) for a in analyses)
        raise UnsupportedModelError(
            f"{type(model).__name__} has no residual branch MoHD can rewrite: among its {found} linear-layer "
            "calls, none writes into a residual add (h + f(h)) whose other operand feeds that layer. "
            "MoHD needs a Transformer-style residual stream (models such as an MLP without skip "
            "connections or a CNN have none).")
    hidden = max(set(hiddens), key=hiddens.count)
    branches: dict[str, Branch] = {}
    skipped: dict[str, str] = {}
    reader_owner: dict[str, str] = {}
    for a in analyses:
        for name, why in a.skipped:   # the analysis's specific reasons first
            skipped.setdefault(name, why)
        for name, why in _skip_reasons(a).items():
            skipped.setdefault(name, why)
        for m in a.branches:
            _add_branch(branches, skipped, reader_owner, m, hidden, modules, filter_fn)
    for g, r in zip(cap.graphs, resolvers):
        for name, why in _weight_products(g.graph, r, g.params, modules).items():
            skipped.setdefault(name, why)
    for name in branches:
        skipped.pop(name, None)
    in_plan = {b.writer for b in branches.values()} | {r for b in branches.values() for r in b.readers}
    skipped = {k: v for k, v in skipped.items() if k not in in_plan}
    called = _unrecognised_calls(cap.graphs, modules)
    for name, module in modules.items():
        if is_linear_layer(module) and name not in in_plan and name not in skipped:
            skipped[name] = called.get(name, NOT_CAPTURED)
    return Plan(hidden_size=hidden, branches=list(branches.values()), skipped=sorted(skipped.items()),
                frontend=cap.frontend, config=config, model_name=type(model).__name__,
                model_params=sum(p.numel() for p in model.parameters()), capture_failures=cap.failures)


def _add_branch(branches, skipped, reader_owner, match, hidden, modules, filter_fn) -> None:
    writer = match.writer.fqn
    if match.writer.out_features != hidden:
        skipped.setdefault(writer, f"writes width {match.writer.out_features}, not the hidden size {hidden}")
        return
    readers = list(dict.fromkeys(r.fqn for r in match.readers))
    if writer in branches:
        if branches[writer].readers != readers:
            skipped[writer] = "called in several places with different readers; left dense"
            branches.pop(writer)
        return
    if filter_fn is not None:
        if not filter_fn(modules[writer], writer):
            skipped[writer] = "writer excluded by filter_fn; its branch is left dense"
            for r in readers:
                skipped.setdefault(r, "its branch's writer is excluded by filter_fn")
            return
        kept = [r for r in readers if filter_fn(modules[r], r)]
        for r in readers:
            if r not in kept:
                skipped[r] = "excluded by filter_fn (stays a dense reader)"
        if not kept:
            skipped[writer] = "every reader of its branch is excluded by filter_fn; left dense"
            return
        readers = kept
    clash = [r for r in readers if r in reader_owner or r == writer]
    if clash:
        skipped[writer] = f"shares reader(s) {clash} with another branch; left dense"
        return
    for r in readers:
        reader_owner[r] = writer
    name = _common_parent(readers + [writer])
    branches[writer] = Branch(name=name, readers=readers, writer=writer, input=match.input_desc,
                              reader_shapes={r: linear_features(modules[r]) for r in readers},
                              writer_shape=linear_features(modules[writer]))
