"""Find: capture a model, analyse every captured graph, and merge the results into a Plan.

Linear layers are recognised by their module (nn.Linear and its subclasses, and GPT-2 style
Conv1D whose weight is stored [in, out]); the output head and embeddings are never readers or
writers (they feed no residual branch). Every linear layer of the model that the plan leaves
dense is listed in `plan.skipped` with the reason.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import fx, nn

from mohdify.config import MoHDConfig
from mohdify.errors import UnsupportedModelError
from mohdify.plan import Branch, Plan

from .analyze import LINEAR_TARGETS, GraphAnalysis, LinearRef, analyze_graph, innermost_module
from .capture import capture, node_value

__all__ = ["is_linear_layer", "linear_features", "find_plan"]


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
    """Recognise calls of the model's linear layers in a graph."""
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
        if val is None or tuple(val.shape) != tuple(module.weight.shape):
            return None   # a matmul inside the module that is not its weight product
        in_f, out_f = linear_features(module)
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
    writers = [b.writer.node for b in analysis.branches]
    hidden = analysis.hidden_size
    reasons = {}
    for lin in analysis.linears:
        if lin.fqn in used or lin.fqn in reasons:
            continue
        feeds = any(lin.node in _ancestors(w) for w in writers)
        if lin.in_features == hidden and not feeds:
            reasons[lin.fqn] = ("reads the residual stream but feeds no residual branch "
                                "(output head, pooler, classifier or a router); never rewritten")
        elif lin.in_features == hidden:
            reasons[lin.fqn] = ("reads a stream other than its branch's input (e.g. cross-attention "
                                "k/v reading the encoder output)")
        else:
            reasons[lin.fqn] = (f"inner layer (in_features={lin.in_features}, out_features={lin.out_features}, "
                                f"hidden size {hidden}): neither a reader nor a writer")
    return reasons


def _ancestors(node: fx.Node) -> set:
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def find_plan(model: nn.Module, example_inputs: Any, config: Optional[MoHDConfig] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> Plan:
    """Capture and analyse `model`; return the Plan. Changes nothing."""
    config = config or MoHDConfig()
    cap = capture(model, example_inputs)
    modules = dict(model.named_modules())
    analyses = [analyze_graph(g.graph, module_resolver(modules, g.prefix), g.prefix) for g in cap.graphs]
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
        for name, why in _skip_reasons(a).items():
            skipped.setdefault(name, why)
        for name, why in a.skipped:
            skipped.setdefault(name, why)
        for m in a.branches:
            _add_branch(branches, skipped, reader_owner, m, hidden, modules, filter_fn)
    for name in branches:
        skipped.pop(name, None)
    in_plan = {b.writer for b in branches.values()} | {r for b in branches.values() for r in b.readers}
    skipped = {k: v for k, v in skipped.items() if k not in in_plan}
    for name, module in modules.items():
        if is_linear_layer(module) and name not in in_plan and name not in skipped:
            skipped[name] = "not called in the captured forward pass"
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
