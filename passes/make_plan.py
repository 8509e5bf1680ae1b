"""Find: capture a model, analyse every captured graph, and merge the results into a Plan.

Linear maps are recognised by passes/resolve.py: calls of linear layers (nn.Linear and its
subclasses, GPT-2 style Conv1D), and other products with a 2-D weight parameter, which are found
but never rewritten (a swapped module there would not be called); the output head and embeddings
are never readers or writers (they feed no residual branch). Every linear layer of the model that the plan leaves
dense is listed in `plan.skipped` with the reason, and so is every module that multiplies
activations by its own parameter without being a linear layer (MoE routers, stacked experts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from torch import nn

from mohdify.config import MoHDConfig
from mohdify.errors import CaptureError, UnsupportedModelError
from mohdify.plan import Plan

from .analyze import analyze_graph
from .capture import capture
from .graphview import innermost_module
from .layers import LayerTable, is_linear_layer
from .resolve import module_resolver, weight_source
from .select import select_branches
from .targets import LINEAR_TARGETS

__all__ = ["find_plan", "NOT_CAPTURED", "NOT_CALLED", "OUTSIDE_BLOCKS"]

NOT_CAPTURED = ("in no captured graph: not called in the forward pass, or run outside the captured graphs "
                "(e.g. eagerly after a dynamo graph break, or outside the blocks captured one by one)")
NOT_CALLED = "not called in the forward pass on example_inputs; left dense"
OUTSIDE_BLOCKS = "called outside the blocks captured one by one (torch.export per block), so in no graph; left dense"


def _unseen_note(name: str, unseen: list[tuple[str, str, str]]) -> str:
    """Which frame dynamo ran eagerly around layer `name`, or ""."""
    frames = [(f, cls, why) for f, cls, why in unseen if not f or name.startswith(f + ".")]
    if not frames:
        return ""
    f, cls, why = max(frames, key=lambda t: len(t[0]))
    return (f"dynamo ran the forward of {f or 'the model'} ({cls}) eagerly after a graph break it could not "
            f"resume from ({why}), so the code there (e.g. residual adds) is in no captured graph")


def _weight_products(graph, resolve, params: dict[str, str], modules: dict[str, nn.Module]) -> dict[str, str]:
    """Modules that multiply activations by their own 2-D parameter but are not linear layers
    (MoE routers, stacked expert weights, a tied embedding used as the head): left dense, said why."""
    out = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS or resolve(node) is not None:
            continue
        w = node.args[LINEAR_TARGETS[node.target][1]] if len(node.args) > 1 else None
        w = weight_source(w)   # through t / transpose / select / index of stacked weights
        if w is None or w.name not in params:
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


def _analyse(cap, table: LayerTable):
    resolvers = [module_resolver(table, g.prefix, g.params) for g in cap.graphs]
    return resolvers, [analyze_graph(g.graph, r, g.prefix) for g, r in zip(cap.graphs, resolvers)]


def find_plan(model: nn.Module, example_inputs: Any, config: Optional[MoHDConfig] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> Plan:
    """Capture and analyse `model`; return the Plan. Changes nothing."""
    config = config or MoHDConfig()
    modules = dict(model.named_modules())
    table = LayerTable.of_model(model)
    cap = capture(model, example_inputs)
    resolvers, analyses = _analyse(cap, table)
    retry_failed = ""
    if cap.frontend == "dynamo" and not any(a.hidden_size for a in analyses):
        # graph breaks inside the blocks put a branch and its residual add in different graphs
        why = "its graphs show no residual add beside the branch that feeds it (graph breaks split the blocks)"
        try:
            cap = capture(model, example_inputs, after="dynamo", failures=[*cap.failures, ("dynamo", why)])
            resolvers, analyses = _analyse(cap, table)
        except CaptureError as err:   # no later front-end captures: the dynamo graphs stand
            retry_failed = f"\nThe capture front-ends after dynamo were tried too: {err}"
    hiddens = [a.hidden_size for a in analyses if a.hidden_size]
    if not hiddens:
        found = sum(len(a.linears) for a in analyses)
        unseen = "".join(f"\n  - the forward of {f or 'the model'} ({cls}): {why}" for f, cls, why in cap.unseen)
        if unseen:
            unseen = ("\ndynamo ran these frames eagerly after a graph break it could not resume from, so the "
                      f"residual adds written in them are in no captured graph:{unseen}\nMake those forwards "
                      "capturable (e.g. torch.where / torch.cond instead of data-dependent Python control flow "
                      "inside a loop), or keep the residual adds inside the repeated blocks of an nn.ModuleList.")
        raise UnsupportedModelError(
            f"{type(model).__name__} has no residual branch MoHD can rewrite: among its {found} linear-layer "
            f"calls (captured with {cap.frontend}), none writes into a residual add (h + f(h)) whose other operand "
            "feeds that layer. MoHD needs a Transformer-style residual stream (models such as an MLP without skip "
            "connections or a CNN have none)." + unseen + retry_failed)
    hidden = max(set(hiddens), key=hiddens.count)
    keep = None if filter_fn is None else (lambda name: filter_fn(modules[name], name))
    selection = select_branches(analyses, hidden, table, keep)
    branches, skipped = selection.branches, selection.skipped
    for g, r in zip(cap.graphs, resolvers):
        for name, why in _weight_products(g.graph, r, g.params, modules).items():
            skipped.setdefault(name, why)
    in_plan = {b.writer for b in branches.values()} | {r for b in branches.values() for r in b.readers}
    called = _unrecognised_calls(cap.graphs, modules)
    ran = set(cap.called)
    for name, module in modules.items():
        if not is_linear_layer(module) or name in in_plan:
            continue
        note = _unseen_note(name, cap.unseen)
        if name not in skipped:
            if name in called:
                skipped[name] = called[name]
            elif cap.called and name not in ran:
                skipped[name] = NOT_CALLED
            elif note:
                skipped[name] = f"called, but in no captured graph: {note}; left dense"
            elif cap.frontend == "torch.export per block" and cap.called:
                skipped[name] = OUTSIDE_BLOCKS
            else:
                skipped[name] = NOT_CAPTURED
        elif note and not skipped[name].startswith("called, but"):
            skipped[name] += f" (as far as the captured graphs show: {note})"
    return Plan(hidden_size=hidden, branches=list(branches.values()), skipped=sorted(skipped.items()),
                frontend=cap.frontend, config=config, model_name=type(model).__name__,
                model_params=sum(p.numel() for p in model.parameters()), capture_failures=cap.failures)
