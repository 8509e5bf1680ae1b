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

from .analyze import GraphAnalysis, LinearRef, analyze_graph
from .graphview import EINSUM_TARGETS, LINEAR_METHODS, LINEAR_TARGETS, innermost_module
from .capture import capture, node_value

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


_LINEAR_FNS = (torch.ops.aten.linear.default, torch._C._nn.linear, F.linear, torch.ops.aten.addmm.default, torch.addmm)
_WEIGHT_STEPS = 8   # ops between a parameter and the weight operand: t, transpose, permute, slice, view
# Ops that take a view, a slice or a copy of a weight (a stacked weight's select/index included).
_WEIGHT_VIEWS = {"t", "T", "mT", "numpy_T", "transpose", "permute", "getitem", "select", "slice", "index",
                 "view", "reshape", "_unsafe_view", "contiguous", "to", "_to_copy", "alias", "detach", "clone",
                 "expand", "unsqueeze", "squeeze", "lift_fresh_copy", "getattr", "type_as"}


def _base_name(n: fx.Node) -> str:
    t = n.target
    return (t if isinstance(t, str) else getattr(t, "__name__", str(t))).split(".")[0]


def weight_source(w, limit: int = _WEIGHT_STEPS):
    """The placeholder or get_attr node a weight operand views (through t, slices, ...), or None."""
    for _ in range(limit):
        if not isinstance(w, fx.Node):
            return None
        if w.op in ("placeholder", "get_attr"):
            return w
        if w.op not in ("call_function", "call_method") or not w.args or _base_name(w) not in _WEIGHT_VIEWS:
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
        if node.target in _LINEAR_FNS or not is_param(args[in_idx]) or not isinstance(args[w_idx], fx.Node):
            return None
        return args[w_idx], args[in_idx]   # W @ x (Mamba's dt_proj.weight @ time_step)
    return args[in_idx], args[w_idx]


def module_resolver(modules: dict[str, nn.Module], prefix: str,
                    params: Optional[dict[str, str]] = None) -> Callable[[fx.Node], Optional[LinearRef]]:
    """Recognise the linear maps of a graph: products of an activation with a 2-D weight parameter.

    `params` maps placeholder names to parameters' qualified names (CapturedGraph.params). A product
    traced inside a linear layer with that layer's own weight is a layer call (`LinearRef.layer`);
    any other (x @ W.T in a parent module, einsum, F.linear on a slice, a bare nn.Parameter) is a
    weight product, found so that the plan can say why it stays dense. Stacked (3-D) expert weights
    are not linear maps here (see `_weight_products`).
    """
    params = params or {}
    named = {name: p for name, p in _named_params(modules)}

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
        left = node.args and node.args[0] is w and node.target not in _LINEAR_FNS   # W @ x
        if left:
            out_f, in_f = int(wv.shape[0]), int(wv.shape[1])
        elif sorted((in_f, out_f)) != sorted(int(d) for d in wv.shape):
            return None
        pname = _weight_param(w, params)
        owner, _, attr = pname.rpartition(".")
        module, param = modules.get(owner), named[pname]
        here, _ = innermost_module(node, prefix)
        layer = modules.get(here)
        if layer is not None and is_linear_layer(layer) and layer.weight is param and not left:   # tied too
            stored = tuple(layer.weight.shape)
            if tuple(wv.shape) in (stored, stored[::-1]) and (in_f, out_f) == linear_features(layer):
                return LinearRef(node, x, here, in_f, out_f)
        if module is not None and is_linear_layer(module) and attr == "weight":
            return LinearRef(node, x, owner, in_f, out_f, layer=False, where=here or "the model's own forward")
        return LinearRef(node, x, owner or pname, in_f, out_f, layer=False, where=pname)
    return resolve


def _named_params(modules: dict[str, nn.Module]):
    for name, module in modules.items():
        for attr, p in module.named_parameters(recurse=False):
            yield (f"{name}.{attr}" if name else attr), p


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


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _holder(name: str, modules: dict[str, nn.Module]) -> str:
    """The closest module at or above `name` that is not a container (nn.Sequential, nn.ModuleList,
    nn.ModuleDict): a branch is named after it, and its router lives there, where no container calls it."""
    while name and isinstance(modules.get(name), _CONTAINERS):
        name = name.rpartition(".")[0]
    return name


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
        reached = _reach(analysis.view, lin.node, linear_nodes, writers | adds)
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
    roles = [r for r in readers if r in branches] + ([writer] if writer in reader_owner else [])
    if roles:
        skipped[writer] = (f"{roles} would be both a reader and a writer (the layer is used in two places "
                           "that are not one branch); left dense")
        return
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
    name = _holder(_common_parent(readers + [writer]), modules)
    branches[writer] = Branch(name=name, readers=readers, writer=writer, input=match.input_desc,
                              reader_shapes={r: linear_features(modules[r]) for r in readers},
                              writer_shape=linear_features(modules[writer]))
