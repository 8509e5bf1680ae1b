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

from torch import fx, nn

from mohdify.config import MoHDConfig
from mohdify.errors import UnsupportedModelError
from mohdify.plan import Branch, Plan

from .analyze import GraphAnalysis, analyze_graph
from .capture import capture
from .graphview import innermost_module
from .resolve import is_linear_layer, linear_features, module_resolver, weight_source
from .targets import LINEAR_TARGETS

__all__ = ["is_linear_layer", "linear_features", "find_plan", "module_resolver", "NOT_CAPTURED"]

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


def common_parent(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if common == parts[0] and len(names) == 1:
        common = common[:-1]
    return ".".join(common)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _holder(name: str, modules: dict[str, nn.Module]) -> str:
    """The closest module at or above `name` that is not a container (nn.Sequential, nn.ModuleList,
    nn.ModuleDict): a branch is named after it, and its router lives there, where no container calls it."""
    while name and isinstance(modules.get(name), _CONTAINERS):
        name = name.rpartition(".")[0]
    return name


def skip_reasons(analysis: GraphAnalysis) -> dict[str, str]:
    """Why each linear layer of a graph that is not a reader or writer stays dense."""
    used = {r.fqn for b in analysis.branches for r in b.readers} | {b.writer.fqn for b in analysis.branches}
    writers = {b.writer.node for b in analysis.branches}
    adds = {b.add for b in analysis.branches} | set(analysis.dense_sums)
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
        blocked = {b.node: b.fqn for b in analysis.blocked}
        reached = _reach(analysis.view, lin.node, linear_nodes, writers | adds | set(blocked))
        if reached & set(blocked) and not reached & writers:
            names = sorted({blocked[n] for n in reached & set(blocked)})
            reasons[lin.fqn] = (f"reads the input of a residual branch whose writer ({', '.join(names)}) is left "
                                "dense (its output reaches the residual add through an op that does not keep "
                                "zeros); left dense")
        elif reached & writers:
            reasons[lin.fqn] = ("reads a stream other than its branch's input (e.g. cross-attention k/v "
                                "reading the encoder output); left dense")
        elif reached & adds:
            reasons[lin.fqn] = ("reads the branch input but only gates or routes the branch's output (e.g. an "
                                "MoE shared-expert gate or router); it is not part of a reader/writer pair; left dense")
        else:
            reasons[lin.fqn] = ("reads the residual stream but feeds no residual branch "
                                "(output head, pooler, classifier or a router); never rewritten")
    return reasons


def _reach(view, start: fx.Node, linear_nodes: set, targets: set, limit: int = 2000) -> set:
    """The nodes of `targets` reached from `start` without passing through another linear layer."""
    users = view.users if view is not None else (lambda n: list(n.users))
    seen, todo, hit = {start}, users(start), set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in targets:
            hit.add(n)
            continue
        if n not in linear_nodes:
            todo.extend(users(n))
    return hit


def _product_reasons(analysis: GraphAnalysis, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Why each weight product that is not a linear layer's own call (LinearRef.layer False) stays dense."""
    out = {}
    for lin in analysis.linears:
        if lin.layer or lin.fqn in out:
            continue
        module = modules.get(lin.fqn)
        if module is not None and is_linear_layer(module):
            out[lin.fqn] = (f"its weight is multiplied outside the layer's own forward (in {lin.where}: x @ W, "
                            "einsum or F.linear on the weight or a slice of it), so a MoHD layer in its place would "
                            "never be called; left dense")
        else:
            owner = type(module).__name__ if module is not None else "the model"
            attr = lin.where.rpartition(".")[2]
            out[lin.fqn] = (f"{owner} multiplies activations by its parameter {attr!r} but is not an nn.Linear "
                            "(an MoE router, a tied embedding head, or weights kept as bare nn.Parameters); "
                            "MoHD swaps nn.Linear layers only; left dense")
    return out


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


def find_plan(model: nn.Module, example_inputs: Any, config: Optional[MoHDConfig] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> Plan:
    """Capture and analyse `model`; return the Plan. Changes nothing."""
    config = config or MoHDConfig()
    cap = capture(model, example_inputs)
    modules = dict(model.named_modules())
    resolvers = [module_resolver(modules, g.prefix, g.params) for g in cap.graphs]
    analyses = [analyze_graph(g.graph, r, g.prefix) for g, r in zip(cap.graphs, resolvers)]
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
            "connections or a CNN have none)." + unseen)
    hidden = max(set(hiddens), key=hiddens.count)
    branches: dict[str, Branch] = {}
    skipped: dict[str, str] = {}
    reader_owner: dict[str, str] = {}
    for a in analyses:
        for name, why in a.skipped:   # the analysis's specific reasons first
            skipped.setdefault(name, why)
        for name, why in _product_reasons(a, modules).items():
            skipped.setdefault(name, why)
        for name, why in skip_reasons(a).items():
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


def _add_branch(branches, skipped, reader_owner, match, hidden, modules, filter_fn) -> None:
    writer = match.writer.fqn
    if match.writer.out_features != hidden:
        skipped.setdefault(writer, f"writes width {match.writer.out_features}, not the hidden size {hidden}")
        return
    if not match.writer.layer:
        for r in match.readers:
            if r.layer:
                skipped.setdefault(r.fqn, f"reads the input of a residual branch whose writer ({writer}) is a weight "
                                          "product, not a linear layer called as a module; the branch is left dense")
        return   # the writer's own reason comes from _product_reasons
    products = [r.where if r.where.startswith(r.fqn + ".") else r.fqn for r in match.readers if not r.layer]
    readers = list(dict.fromkeys(r.fqn for r in match.readers if r.layer))
    if not readers:
        skipped[writer] = (f"every reader of its branch ({', '.join(dict.fromkeys(products))}) is a weight product "
                           "(x @ W, einsum or F.linear on a weight or a slice of it), "
                           "not a linear layer called as a module; left dense")
        return
    def refuse(why: str, layers=readers) -> None:
        skipped[writer] = why
        for r in layers:
            if r != writer:
                skipped.setdefault(r, f"reads the input of the branch written by {writer}, which is left dense: {why}")

    roles = [r for r in readers if r in branches] + ([writer] if writer in reader_owner else [])
    if roles:
        return refuse(f"{roles} would be both a reader and a writer (the layer is used in two places that are not "
                      "one branch); left dense")
    if writer in branches:
        if branches[writer].readers != readers:
            refuse("called in several places with different readers; left dense",
                   readers + branches.pop(writer).readers)
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
        return refuse(f"shares reader(s) {clash} with another branch; left dense",
                      [r for r in readers if r not in clash])
    for r in readers:
        reader_owner[r] = writer
    name = _holder(common_parent(readers + [writer]), modules)
    branches[writer] = Branch(name=name, readers=readers, writer=writer, input=match.input_desc,
                              reader_shapes={r: linear_features(modules[r]) for r in readers},
                              writer_shape=linear_features(modules[writer]))
